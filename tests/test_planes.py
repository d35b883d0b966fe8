import numpy as np
import pytest

from py4dstem_deepcdi.planes import fit_plane, remove_plane


def test_fit_plane_recovers_a_plane_and_removes_only_it():
    i, j = np.meshgrid(np.arange(7), np.arange(5), indexing="ij")
    plane = 0.3 - 0.02 * i + 0.05 * j
    np.testing.assert_allclose(fit_plane(plane), plane, atol=1e-12)
    rng = np.random.default_rng(0)
    bump = rng.normal(size=(7, 5))
    residual = remove_plane(plane + bump)
    # the residual is orthogonal to 1, i and j (the normal equations of the fit)
    for basis in (np.ones_like(bump), i, j):
        assert abs(float((residual * basis).sum())) < 1e-9
    np.testing.assert_allclose(residual, remove_plane(bump), atol=1e-12)


def test_fit_plane_channels_are_independent():
    i, j = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    values = np.stack([1 + i, 2 - 3 * j], -1).astype(float)
    np.testing.assert_allclose(fit_plane(values), values, atol=1e-12)


def test_fit_plane_rejects_bad_input():
    with pytest.raises(ValueError, match="grid"):
        fit_plane(np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        fit_plane(np.array([[0.0, np.nan], [1.0, 2.0]]))
