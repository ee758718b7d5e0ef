"""Docstring examples run: every usage example in diffalign's docstrings is a doctest, and every doctest passes.

A usage example is an indented docstring line that calls a function or class the module itself defines
(``    cfg = load_config(...)``). Written as prose it can rot unseen (the config docstring once showed an override key
that the config refuses), so such lines must be ``>>>`` examples, and they are run here from the repository root
(examples name ``configs/...`` files). Formulas in docstrings (``loss = mean(...)``) call no module name and are
left alone.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import diffalign

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(info.name for info in pkgutil.walk_packages(diffalign.__path__, "diffalign.")
                 if not info.name.endswith("__main__"))
DOCTESTED = [name for name in MODULES
             if ">>> " in Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")]
CALL = re.compile(r"^\s{4,}(?:[\w.,\[\] ]+=\s*)?([A-Za-z_]\w*)(?:\.\w+)*\(")


def docstrings(tree: ast.Module):
    yield "module", ast.get_docstring(tree, clean=True)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name, ast.get_docstring(node, clean=True)


def prose_examples(name: str) -> list[str]:
    """Indented lines of ``name``'s docstrings that call one of the module's own names outside a doctest."""
    path = Path(importlib.import_module(name).__file__)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    found = []
    for owner, text in docstrings(tree):
        for line in (text or "").splitlines():
            match = CALL.match(line)
            if match and match.group(1) in defined and not line.lstrip().startswith((">>>", "...")):
                found.append(f"{name} ({owner}): {line.strip()}")
    return found


def test_usage_examples_are_doctests():
    found = [line for name in MODULES for line in prose_examples(name)]
    assert not found, "write these docstring examples as >>> doctests:\n" + "\n".join(found)


def test_the_example_finder_flags_a_prose_call_but_not_a_formula(tmp_path, monkeypatch):
    (tmp_path / "example_mod.py").write_text(
        '"""Doc.\n\nProse.\n\n    cfg = load_config("x.yaml")\n    loss = mean(errors)\n    >>> load_config("y")\n"""\n'
        "def load_config(path):\n    return path\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert prose_examples("example_mod") == ['example_mod (module): cfg = load_config("x.yaml")']


@pytest.mark.parametrize("name", DOCTESTED)
def test_doctests_pass(name, monkeypatch, tmp_path):
    module = importlib.import_module(name)
    tests = [test for test in doctest.DocTestFinder(exclude_empty=True).find(module) if test.examples]
    assert tests, f"{name} mentions '>>> ' but holds no doctest"
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DIFFALIGN_DOCTEST_TMP", str(tmp_path))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest example(s) failed in {name} (see the output above)"
