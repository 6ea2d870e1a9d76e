"""The packages are layers: imports point one way, from a higher layer to a lower one, and never in a circle.

Every import statement of `pipeline`, `workers` and `manifests` counts, wherever it stands (module level, inside a
function, under `if TYPE_CHECKING:`): a lazy import hides a circle from the interpreter, not from the design.
`import a.b.c` and `from a.b import c` are edges to the module `a.b.c` (a package's `__init__` is an edge only
when the package itself is named).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "manifests")

# Bottom to top; a module may import its own top-level package and any layer below its own.
LAYERS: dict[str, float] = {
    "manifests": 0,  # records, atomic writes, verification, collect: below all of pipeline
    "pipeline": 0.5,  # the root package: its version, nothing else
    "pipeline.core": 1,
    "pipeline.augment": 2,
    "pipeline.models": 2,
    "pipeline.data": 3,
    "pipeline.softlabels": 3,
    "pipeline.train": 4,
    "pipeline.methods": 5,
    "pipeline.config": 6,
    "pipeline.run": 7,
    "pipeline.commands": 8,
    "pipeline.torchrun": 8.5,  # the `torchrun -m pipeline.torchrun` entry point of pipeline.commands.torchrun
    "workers": 9,
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of `mods` it imports (the longest known prefix of each imported name)."""

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                target = known(t)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(mod: str) -> str:
    """The entry of LAYERS a module belongs to (its longest prefix there)."""
    best = ""
    for name in LAYERS:
        if (mod == name or mod.startswith(name + ".")) and len(name) > len(best):
            best = name
    if not best:
        raise AssertionError(f"module {mod} belongs to no layer: add its package to LAYERS in {__file__}")
    return best


def upward(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for each import from a lower layer to a higher one, or between two packages of the same rank."""
    bad = []
    for mod, targets in sorted(graph.items()):
        own = layer_of(mod)
        for t in sorted(targets):
            other = layer_of(t)
            if other != own and LAYERS[other] >= LAYERS[own]:
                bad.append(f"{mod} ({own}, layer {LAYERS[own]}) -> {t} ({other}, layer {LAYERS[other]})")
    return bad


def test_no_import_circle() -> None:
    found = cycles(import_graph(modules()))
    assert not found, "import circles (each a set of modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_imports_point_down_the_layers() -> None:
    bad = upward(import_graph(modules()))
    assert not bad, "imports from a lower layer to a higher one (or between peers):\n" + "\n".join(bad)


def test_every_module_has_a_layer() -> None:
    for mod in modules():
        layer_of(mod)


def test_every_package_says_what_it_owns_and_may_import() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*/__init__.py")
               if "may import" not in (ast.get_docstring(ast.parse(p.read_text())) or "").lower()]
    assert not missing, f"package docstrings without a 'May import:' line: {missing}"


@pytest.mark.parametrize("source, expected", [
    ("a -> b, b -> c, c -> a, c -> d", [["a", "b", "c"]]),
    ("a -> b, b -> c", []),
])
def test_the_checker_finds_circles(source: str, expected: list[list[str]]) -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in source.split(", "):
        a, b = edge.split(" -> ")
        graph[a].add(b)
    assert cycles(graph) == expected


def test_the_checker_finds_an_upward_import() -> None:
    graph = {"pipeline.data.holdout": {"pipeline.methods.env", "pipeline.core.imageops"},
             "pipeline.models.factory": {"pipeline.augment.dsa"}}
    assert upward(graph) == [
        "pipeline.data.holdout (pipeline.data, layer 3) -> pipeline.methods.env (pipeline.methods, layer 5)",
        "pipeline.models.factory (pipeline.models, layer 2) -> pipeline.augment.dsa (pipeline.augment, layer 2)",
    ]
