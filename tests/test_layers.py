"""Imports point one way, down the layers the tree shows:

core (offramp/core, the generated offramp/proto) <- training (offramp/training) <- serving (offramp/serving,
and link emulation in offramp/netem) <- the daemons (edge_node, cloud_node) <- experiments (orchestrator,
bench) <- the command line and demo (offramp/cli).

A module may import its own layer and those below; lazy imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Package (as a dotted prefix) -> layer; the longest matching prefix decides.
LAYERS = {
    "offramp.core": 0, "offramp.proto": 0,
    "offramp.training": 1,
    "offramp.serving": 2, "offramp.netem": 2, "offramp.client": 2,
    "edge_node": 3, "cloud_node": 3,
    "orchestrator": 4, "bench": 4,
    "offramp.cli": 5,
}
PROJECT = ("offramp", "edge_node", "cloud_node", "orchestrator", "bench")


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name, or None outside the project."""
    if module == "offramp":  # the root package holds the version alone: anything may read it
        return 0
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    if module.split(".")[0] in PROJECT:
        raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Project modules ``path`` imports, wherever the import statement is (lazy ones included)."""
    names = set()
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                names.add(node.module)
    return {n for n in names if n.split(".")[0] in PROJECT}


def project_modules() -> list[Path]:
    return [p for top in PROJECT for p in sorted((ROOT / top).rglob("*.py"))
            if "/proto/offramp/" not in p.as_posix()]


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    if module_name(path) == "offramp":
        assert not imported(path), "the root package imports nothing of the project"
        return
    own = layer_of(module_name(path))
    for name in imported(path):
        assert layer_of(name) <= own, f"{module_name(path)} (layer {own}) imports {name} (layer {layer_of(name)})"


def test_every_package_has_a_layer() -> None:
    for path in project_modules():
        name = module_name(path)
        if name != "offramp":
            assert layer_of(name) is not None, name


def test_the_root_package_holds_only_layers() -> None:
    loose = sorted(p.name for p in (ROOT / "offramp").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules directly in offramp/ belong to a layer's package: {loose}"


def test_a_climbing_import_is_caught(tmp_path: Path) -> None:
    assert layer_of("offramp.core.halves") < layer_of("offramp.training.train") < layer_of("offramp.serving.config")
    assert layer_of("offramp.serving.batcher") < layer_of("edge_node.engine") < layer_of("bench.exits")
    assert layer_of("bench.exits") < layer_of("offramp.cli.demo")
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("offramp.somewhere")


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_the_project_not_each_other(path: Path) -> None:
    """Shared benchmark machinery (load, core pinning, results files) lives in orchestrator/, not in a benchmark."""
    others = sorted(n for n in imported(path) if n == "bench" or n.startswith("bench."))
    assert not others, f"{path.name} imports {others}"
