"""The README's layout section matches the package tree: every top-level module and subpackage is listed, and
every ``diffalign/...`` path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layout_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def test_every_path_the_layout_names_exists():
    named = re.findall(r"diffalign/[\w/.]+", layout_block())
    assert named
    missing = [path for path in named if not (REPO / path.rstrip("/")).exists()]
    assert not missing, f"README layout names paths that do not exist: {missing}"


def test_every_top_level_module_and_subpackage_is_in_the_layout():
    block = layout_block()
    names = [path.name for path in (REPO / "diffalign").iterdir()
             if (path.suffix == ".py" and path.stem not in ("__init__", "__main__")) or
             (path.is_dir() and not path.name.startswith(("__", ".")))]
    absent = [name for name in names if not re.search(rf"(diffalign/|\b){re.escape(name)}\b", block)]
    assert not absent, f"README layout does not mention: {absent}"
