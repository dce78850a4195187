"""The package's shape, read from the source with `ast` (nothing is imported):

- no import cycle between coati_ray modules, counting lazy imports inside functions (they are
  still arrows: a cycle through one only moves the failure to run time), nor between its
  top-level parts (subpackages and top-level modules);
- no module over MAX_LINES lines;
- the ground floor imports (almost) nothing from coati_ray: `runtime` only `errors`, `presets` nothing.
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "coati_ray"
ROOT = PACKAGE.name
MAX_LINES = 400
GROUND_FLOOR = {f"{ROOT}.runtime": {f"{ROOT}.errors"}, f"{ROOT}.errors": set(), f"{ROOT}.presets": set()}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str | None:
    """The module a `from X import ...` names (relative imports resolved against `importer`)."""
    if node.level == 0:
        return node.module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported coati_ray module, line) for every import in `path`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(node, name, path.name == "__init__.py")
            if source is None:
                continue
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod; else pkg itself
                sub = f"{source}.{a.name}"
                out.append((sub if sub in MODULES else source, node.lineno))
    return [(m, line) for m, line in out if m == ROOT or m.startswith(ROOT + ".")]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}; unknown names are kept as they are."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        edges = graph.setdefault(name, {})
        for target, line in imports_of(name, path):
            if target != name:
                edges.setdefault(target, line)
    return graph


def part_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, str]]:
    """The graph between top-level parts (coati_ray.models, coati_ray.defaults, ...): part -> {part: an
    import that makes the arrow}."""
    def part(m: str) -> str:
        return ".".join(m.split(".")[:2])

    parts: dict[str, dict[str, str]] = {}
    for a, edges in graph.items():
        out = parts.setdefault(part(a), {})
        for b, line in edges.items():
            if part(b) != part(a):
                out.setdefault(part(b), f"{a} (line {line}) -> {b}")
    return parts


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (first node repeated last) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth <= number of modules (about a hundred)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first node (breadth-first, inside the component)."""
    start, members = comp[0], set(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in strongly connected component {comp}")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in pairwise(cycle)]
    return " | ".join(steps)


# --- the finders, checked on small made-up graphs ------------------------------------------------------
def test_the_cycle_finder_reports_a_cycle_and_only_cycles():
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []
    assert find_cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c", "a"]]
    two = find_cycles({"a": {"b": 1}, "b": {"a": 1}, "c": {"d": 1}, "d": {"c": 1}})
    assert sorted(map(tuple, two)) == [("a", "b", "a"), ("c", "d", "c")]


def test_lazy_and_relative_imports_are_arrows(tmp_path):
    src = ("from . import sibling\n"
           "def f():\n"
           f"    from {ROOT}.workers.buffer import ReplayBuffer\n"
           f"    import {ROOT}.errors\n")
    path = tmp_path / "mod.py"
    path.write_text(src)
    found = {m for m, _ in imports_of(f"{ROOT}.workers.generator", path)}
    assert found == {f"{ROOT}.workers", f"{ROOT}.workers.buffer", f"{ROOT}.errors"}  # (sibling: no such module)


# --- the package -------------------------------------------------------------------------------------
def test_the_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert f"{ROOT}.workers.buffer" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(describe(graph, c) for c in cycles)


def test_the_top_level_parts_import_each_other_without_a_cycle():
    parts = part_graph(import_graph())
    cycles = find_cycles(parts)
    assert not cycles, f"{len(cycles)} import cycle(s) between parts of {ROOT}:\n" + "\n".join(
        " | ".join(parts[a][b] for a, b in pairwise(c)) for c in cycles)


def test_no_module_is_longer_than_the_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: " + ", ".join(f"{m} ({n})" for m, n in sorted(long.items()))


@pytest.mark.parametrize("module", sorted(GROUND_FLOOR))
def test_the_ground_floor_imports_only_errors(module):
    imported = {m for m, _ in imports_of(module, MODULES[module])} - {module}
    assert imported <= GROUND_FLOOR[module], f"{module} imports {sorted(imported - GROUND_FLOOR[module])}"


# Where the word "nccl" may stand: the NCCL weight-sync transport, its registry line and flag help,
# and the one place that picks torch.distributed's backend for a trainer group (gloo / nccl), which
# is not weight sync. The driver, workers and engines never ask which transport they have.
NCCL_ALLOWED = {f"{ROOT}.sync.nccl", f"{ROOT}.sync", f"{ROOT}.ppo_config", f"{ROOT}.config", f"{ROOT}.runtime"}


def test_only_the_nccl_transport_knows_about_nccl():
    found = {name: [i for i, line in enumerate(path.read_text().splitlines(), 1) if "nccl" in line.lower()]
             for name, path in MODULES.items()}
    stray = {name: lines for name, lines in found.items() if lines and name not in NCCL_ALLOWED}
    assert not stray, f"'nccl' outside the NCCL weight-sync module: {stray}"
    driver = [f"{ROOT}.pipelines.ppo", f"{ROOT}.pipelines.ppo_roles", f"{ROOT}.pipelines.ppo_state"]
    assert all(not found[d] for d in driver)
