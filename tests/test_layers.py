"""Imports point one way: core (offramp/) <- serving (edge_node, cloud_node) <- experiments (orchestrator, bench)
<- the command line (offramp/cli.py, and the demo it runs)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"offramp": 0, "edge_node": 1, "cloud_node": 1, "orchestrator": 2, "bench": 2}
ON_TOP = {"offramp/cli.py", "offramp/demo.py"}  # the command line sits above everything it runs


def imported(path: Path) -> set[str]:
    """Top-level packages ``path`` imports, wherever the import statement is (lazy ones included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", list(LAYERS))
def test_no_module_imports_a_layer_above_its_own(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative in ON_TOP or "/proto/" in relative:
            continue
        for name in imported(path):
            top = name.split(".")[0]
            assert name != "offramp.cli", f"{relative} imports the command line"
            assert LAYERS.get(top, 0) <= LAYERS[package], f"{relative} imports {name}, a layer above it"
