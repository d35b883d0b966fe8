"""The virtual ADF image (comparison/adf.py) and what the comparison reads from a reconstruction
(comparison/inputs.py)."""

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from comparison_cases import finished_reconstruction

import py4dstem_deepcdi.comparison as comparison_package
from py4dstem_deepcdi.comparison.adf import virtual_adf
from py4dstem_deepcdi.comparison.inputs import (
    is_reconstruction,
    reconstruction_vacuum,
    scan_patterns,
    subsample_of,
)


def _fake(patterns, centre, semiangle=10.0, angular=2.0, subsample=1, vacuum=None, model_vacuum=None):
    """A duck-typed reconstruction: only the public attributes the comparison reads."""
    return SimpleNamespace(
        datacube=patterns, options={"subsample": subsample},
        data=SimpleNamespace(centre=np.asarray(centre, float), data_angular_sampling=angular),
        geometry=SimpleNamespace(semiangle_cutoff=semiangle), vacuum_probe_intensity=vacuum,
        model=SimpleNamespace(geometry=SimpleNamespace(vacuum_probe_intensity=model_vacuum)),
        preprocess=lambda **kw: None,
    )


def test_virtual_adf_sums_the_annulus():
    patterns = np.zeros((3, 4, 32, 32))
    patterns[:, :, 16, 16] = 100.0  # bright field only
    patterns[1, 2, 16, 28] = 7.0  # 12 px from the centre: inside the annulus 5.5..15 px
    patterns[0, 0, 16, 18] = 5.0  # 2 px: bright field, not counted
    image, info = virtual_adf(_fake(patterns, [[16.0, 16.0]]), inner_factor=1.1)
    assert image.shape == (3, 4)
    assert info["bright_field_px"] == pytest.approx(5.0) and info["inner_px"] == pytest.approx(5.5)
    assert info["outer_px"] == pytest.approx(15.0) and info["outer_mrad"] == pytest.approx(30.0)
    expected = np.zeros((3, 4))
    expected[1, 2] = 7.0
    np.testing.assert_allclose(image, expected)


def test_virtual_adf_without_dark_field():
    patterns = np.ones((3, 3, 16, 16))
    image, info = virtual_adf(_fake(patterns, [[8.0, 8.0]], semiangle=14.0, angular=2.0))  # disk 7 px of 7
    assert image is None and "no dark-field" in info["reason"]


def test_virtual_adf_of_a_reconstruction():
    recon = finished_reconstruction()
    image, info = virtual_adf(recon)
    assert image.shape == (12, 12) and np.all(image >= 0)
    assert info["inner_mrad"] == pytest.approx(1.1 * 17.1)


def test_duck_typed_inputs():
    patterns = np.arange(4 * 6 * 2 * 2, dtype=float).reshape(4, 6, 2, 2)
    fake = _fake(patterns, [[1.0, 1.0]], subsample=2)
    assert is_reconstruction(fake) and not is_reconstruction(patterns)
    assert subsample_of(fake) == 2 and subsample_of(_fake(patterns, [[1, 1]], subsample=None)) == 1
    view = scan_patterns(fake)
    assert view.shape == (2, 3, 2, 2) and np.shares_memory(view, patterns)
    np.testing.assert_array_equal(view, patterns[::2, ::2])
    mine, models = np.ones((2, 2)), np.full((2, 2), 2.0)
    assert reconstruction_vacuum(_fake(patterns, [[1, 1]], vacuum=mine, model_vacuum=models), (2, 2)) is mine
    assert reconstruction_vacuum(_fake(patterns, [[1, 1]], model_vacuum=models), (2, 2)) is models
    assert reconstruction_vacuum(_fake(patterns, [[1, 1]], model_vacuum=models), (4, 4)) is None
    assert is_reconstruction(finished_reconstruction())


def test_the_package_never_imports_the_reconstruction():
    """The user class imports the comparison; the comparison reads it through public attributes only."""
    for path in Path(comparison_package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "reconstruction" not in (node.module or ""), f"{path.name} imports {node.module}"
            assert not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(node))), \
                f"{path.name}: an import inside {getattr(node, 'name', '?')}"
