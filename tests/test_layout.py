"""The package's folders are its layers: imports run downward only, and no circle.

Read from the source (every ``import`` statement, those inside functions
too), so a lazy import cannot hide an upward tie. docs/ARCHITECTURE.md draws
the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "zoo"

# lower number = lower layer; a package may import its own modules and any lower layer
LAYERS = {
    "zoo.errors": 0,
    "zoo.core": 1,
    "zoo.models": 2,
    "zoo.catalog": 3,
    "zoo.quantize": 4,
    "zoo.train": 5, "zoo.merge": 5, "zoo.hub": 5, "zoo.serve": 5, "zoo.inference": 5,
    "zoo.apps": 6, "zoo.ui": 6,
    "zoo.cli": 7,
    "zoo.testing": 7,
    "zoo.__main__": 8,
    "zoo": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("zoo"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zoo"):
            found.add(node.module)
            # "from zoo.cli import catalog" imports the module zoo.cli.catalog
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(
                             ".py").exists()
                         or (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).is_dir())
    return found


def layer_of(module: str) -> tuple[str, int]:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_downward(module):
    package, level = layer_of(module)
    for target in GRAPH[module]:
        other, other_level = layer_of(target)
        assert other == package or other_level < level, (
            f"{module} (layer {level}) imports {target} (layer {other_level})")


def test_no_import_circle():
    modules = set(GRAPH)
    edges = {m: {t for t in GRAPH[m] if t in modules and t != m} for m in GRAPH}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_no_flat_feature_modules():
    """Only the bottom (errors) and the entry points sit at the top of the package."""
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "errors.py"]
