"""The package's layout: imports point down the layers of docs/architecture.md, no module grows past its room."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "py4dstem_deepcdi"

#: layer of every top-level module or subpackage (docs/architecture.md); a module imports only lower layers
LAYERS = {
    # 0: array backends, files, version
    "_version": 0, "backend": 0, "io": 0, "seeds": 0, "pretrained": 0,
    # 1: leaf concepts: geometry, encoding, sampling, objects, the network, FRC
    "planes": 1, "probe": 1, "scan": 1, "encoding": 1, "poisson": 1, "images": 1, "network": 1, "frc": 1, "dose": 1,
    "defects": 1, "rotation": 1,
    # 2: physics and data preparation
    "simulation": 2, "runtime": 2, "preprocessing": 2,
    # 3: training data, model files, the optional runtimes, the pieces of an image
    "stream": 3, "models": 3, "runtimes": 3, "ramp": 3, "stitching": 3, "probe_epie": 3,
    # 4: the network pass (int8 calibrated on the stream), training, scoring against ePIE and the truth
    "inference": 4, "training": 4, "comparison": 4, "probe_overlap": 4,
    # 5-7: the user's class, what builds on it, entry points
    "reconstruction": 5, "probe_recovery": 6, "__init__": 7, "cli": 7,
}
MAX_LINES = 600


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts


def _imported_tops(path: Path, parts: tuple[str, ...]) -> set[str]:
    """Top-level package modules imported by the file (relative imports resolved)."""
    package = list(parts[:-1])  # the package the file sits in (for __init__.py: its own)
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                tops.add(target[0])
            else:  # "from . import x" at the package root
                tops.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("py4dstem_deepcdi"):
            tops.add(node.module.split(".")[1] if "." in node.module else "__init__")
    return tops


def test_every_module_has_a_layer():
    tops = {parts[0] for _, parts in _modules()}
    assert tops <= set(LAYERS), f"add {sorted(tops - set(LAYERS))} to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("path, parts", list(_modules()), ids=lambda v: "/".join(v) if isinstance(v, tuple) else "")
def test_imports_point_down(path, parts):
    own = parts[0]
    for top in _imported_tops(path, parts) - {own}:
        assert LAYERS[top] < LAYERS[own], f"{'/'.join(parts)} (layer {LAYERS[own]}) imports {top} (layer {LAYERS[top]})"


@pytest.mark.parametrize("path, parts", list(_modules()), ids=lambda v: "/".join(v) if isinstance(v, tuple) else "")
def test_no_module_is_a_monolith(path, parts):
    assert len(path.read_text().splitlines()) <= MAX_LINES
