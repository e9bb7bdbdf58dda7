"""The package's import graph: the shared value types are a leaf, nothing imports another module
that imports it back, and the experimental peer transport is imported by nothing outside it.

Imports are read from the source (every ``import`` statement, in functions too, except under
``if TYPE_CHECKING:``), so lazy imports count as edges as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_replay"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ``moe_replay`` modules ``path`` imports outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("moe_replay"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_replay"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # "from pkg import mod" names a module; "from mod import name" names the module itself.
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _is_package_init(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def test_the_value_types_are_a_leaf() -> None:
    assert _graph()["moe_replay.types"] == set()


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _graph()
    # A package's __init__ re-exporting its modules is not a cycle of the code's own: leave the
    # edges into package __init__ files out (their modules' edges still count).
    edges = {m: {d for d in deps if not _is_package_init(d)} for m, deps in graph.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_nothing_outside_the_peer_transport_imports_it() -> None:
    # The transport registry names it as data (a module path); deleting the package touches
    # nothing else.
    users = {
        module
        for module, deps in _graph().items()
        if not module.startswith("moe_replay.parallel.peers")
        and any(d.startswith("moe_replay.parallel.peers") for d in deps)
    }
    assert users == set()
