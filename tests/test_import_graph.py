"""The package's import graph has no cycles, counting imports inside functions too (they only hide a cycle).

Edges are read with ``ast`` from every module of ``diffalign``: ``import diffalign.a.b``, ``from diffalign.a import
b`` (a submodule, or a name defined in ``diffalign/a/__init__.py``) and relative imports. Importing a submodule
runs its package's ``__init__`` first, but that is not counted: a package that imports its own submodules is
the usual layout, and only explicit imports make a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import diffalign

PACKAGE_ROOT = Path(diffalign.__file__).parent


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = ["diffalign", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The diffalign modules that module ``name`` (its file at ``path``) imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            # a name from the package itself (not a submodule) is an edge to the package's __init__
            targets = submodules + ([base] if len(submodules) < len(node.names) else [])
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_function_level_and_package_imports(tmp_path):
    modules = {"diffalign.x": tmp_path / "x.py", "diffalign.x.y": tmp_path / "y.py", "diffalign.z": tmp_path / "z.py"}
    source = tmp_path / "z.py"
    source.write_text("def f():\n    from .x import y, helper\n    import diffalign.z\n")
    assert imported_modules("diffalign.z", source, modules) == {"diffalign.x", "diffalign.x.y"}


def test_diffalign_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    found = cycles(graph)
    detail = "\n".join(
        " <-> ".join(component) + "\n    " + "\n    ".join(
            f"{module} imports {', '.join(sorted(graph[module] & set(component)))}" for module in component)
        for component in found)
    assert not found, f"import cycles:\n{detail}"
