"""mialib's import graph, read from the source with ast: no circles, and the low modules import nothing above them.

Every `import` and `from ... import` of a mialib module counts, at module level and inside functions
(a function-level import is still an arrow: it only defers the circle to the first call).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mialib"

# The infrastructure below the attacks, the runs and the studies (bottom to top, roughly).
LOW = (
    "mialib.hashing",
    "mialib.paths",
    "mialib.files",
    "mialib.memo",
    "mialib.ddim",
    "mialib.similarity",
    "mialib.inversion",
    "mialib.trajectories",
)
# The upper layers; a low module importing one of these, or a submodule of one, points up.
UPPER = (
    "mialib.attacks",
    "mialib.runs",
    "mialib.scoring",
    "mialib.studies",
    "mialib.experiment",
    "mialib.cli",
    "mialib.audit",
    "mialib.plots",
)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute name a relative `from` refers to, as the import system resolves it."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the mialib modules it imports (a `from X import name` that names a submodule points at it)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.module, node.level)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            for target in targets:
                # `import mialib.a.b` names a module; a name that is not one is an attribute of its parent
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _is_upper(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in UPPER)


def test_the_graph_sees_known_arrows():
    graph = import_graph()
    assert "mialib.ddim" in graph["mialib.settings"]
    assert "mialib.attacks.registry" in graph["mialib.runs"]
    assert "mialib.runs" in graph["mialib.cli"]  # a function-level `from . import imagesets, runs`


def test_the_cycle_finder_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_mialib_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_low_modules_import_nothing_from_the_upper_layers():
    graph = import_graph()
    present = [name for name in LOW if name in graph]
    assert {"mialib.hashing", "mialib.paths", "mialib.ddim", "mialib.inversion", "mialib.trajectories"} <= set(present)
    upward = {name: sorted(t for t in graph[name] if _is_upper(t)) for name in present}
    upward = {name: targets for name, targets in upward.items() if targets}
    assert not upward, f"low modules importing upper layers: {upward}"
