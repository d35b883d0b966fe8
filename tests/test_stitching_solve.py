"""solve_offsets(): exact offsets, gauge per connected group, conjugate gradients with the preconditioner, checks."""

import numpy as np
import pytest
from _stitching_data import H, PlaneWaves, W, circular_mask, cut_patches, integer_scan, rotated_lattice
from _stitching_data import exact_data as make_exact_data

from py4dstem_deepcdi.stitching import OffsetSolution, StitchOptions, solve_offsets


@pytest.fixture
def exact_data(rng):
    return make_exact_data(rng)


def test_lsq_recovers_offsets_exactly(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    sol = solve_offsets(patches, pos, mask, tol=1e-12, device="cpu")
    assert isinstance(sol, OffsetSolution)
    assert isinstance(sol.offsets, np.ndarray) and sol.offsets.shape == (len(pos),)
    err = sol.offsets + offsets  # the solved offsets undo the added ones, up to one constant
    assert np.ptp(err) < 1e-9
    assert abs(sol.offsets.mean()) < 1e-12  # gauge: zero-mean offsets
    assert sol.method == "lsq" and sol.converged and sol.relative_residual < 1e-11
    assert sol.n_components == 1 and sol.n_pairs > 5 * len(pos)
    assert sol.energy_before > 1e3 and sol.energy_after < 1e-9 * sol.energy_before


def test_options_object_equals_keywords(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    a = solve_offsets(patches, pos, mask, StitchOptions(min_overlap=0.4, tol=1e-10))
    b = solve_offsets(patches, pos, mask, min_overlap=0.4, tol=1e-10)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.n_pairs == b.n_pairs < solve_offsets(patches, pos, mask).n_pairs  # a larger overlap: fewer pairs
    with pytest.raises(TypeError, match="solve_offsets\\(\\) got unexpected keyword argument\\(s\\) 'tilt'"):
        solve_offsets(patches, pos, mask, tilt=True)


def test_disconnected_groups_warn_and_get_zero_mean_each(rng):
    obj = PlaneWaves(rng)
    mask = circular_mask()
    a = integer_scan(rng, n=6)
    b = a + np.array([0.0, 60.0])  # far away: no overlap between the groups
    pos = np.concatenate([a, b])
    patches = cut_patches(obj, pos, mask) + rng.uniform(-3, 3, len(pos))[:, None, None]
    with pytest.warns(RuntimeWarning, match="2 disconnected groups"):
        sol = solve_offsets(patches, pos, mask)
    assert sol.n_components == 2
    assert abs(sol.offsets[: len(a)].mean()) < 1e-12 and abs(sol.offsets[len(a) :].mean()) < 1e-12


def test_scan_order_does_not_matter(rng):
    """A raster is indexed as a lattice; shuffled, the same positions go through the cell search: same solution."""
    obj = PlaneWaves(rng, min_period=16.0)
    mask = circular_mask()
    pos = rotated_lattice(n=14)
    patches = cut_patches(obj, pos, mask) + rng.uniform(-3, 3, len(pos))[:, None, None]
    perm = rng.permutation(len(pos))
    a = solve_offsets(patches, pos, mask, tol=1e-12)
    b = solve_offsets(patches[perm], pos[perm], mask, tol=1e-12)
    assert a.n_pairs == b.n_pairs
    assert a.energy_before == pytest.approx(b.energy_before, rel=1e-12)
    np.testing.assert_allclose(b.offsets, a.offsets[perm], atol=1e-8)


def test_preconditioned_cg_converges_in_few_iterations(rng):
    """Two-level preconditioning: 16 iterations for 64x64 and 128x128 scans alike (Jacobi alone: 33 and 63)."""
    mask = circular_mask()
    gy, gx = np.mgrid[:64, :64]
    pos = np.stack([gy.ravel(), gx.ravel()], axis=1).astype(np.float64)
    patches = np.zeros((len(pos), H, W), dtype=np.float32)
    patches += rng.uniform(-3, 3, len(pos)).astype(np.float32)[:, None, None]
    sol = solve_offsets(patches, pos, mask)
    assert sol.converged and sol.iterations <= 20
    assert sol.relative_residual <= 1e-8
    shuffled = rng.permutation(len(pos))  # the cell search and the sparse adjacency: the same iterations
    assert solve_offsets(patches[shuffled], pos[shuffled], mask).iterations == sol.iterations


def test_unconverged_cg_warns(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    with pytest.warns(RuntimeWarning, match="stopped after 2 conjugate-gradient iterations"):
        sol = solve_offsets(patches, pos, mask, max_iter=2)
    assert not sol.converged and sol.iterations == 2 and sol.relative_residual > 1e-8


def test_zero_mismatch_needs_no_iteration():
    mask = circular_mask()
    pos = np.stack(np.meshgrid(np.arange(5.0), np.arange(5.0), indexing="ij"), -1).reshape(-1, 2)
    sol = solve_offsets(np.zeros((25, H, W)), pos, mask)
    assert sol.iterations == 0 and sol.converged and sol.energy_before == 0.0
    np.testing.assert_array_equal(sol.offsets, 0.0)


def test_bad_inputs_raise_clear_errors(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    with pytest.raises(ValueError, match="3-D"):
        solve_offsets(patches[0], pos, mask)
    with pytest.raises(ValueError, match=r"\(J, 2\)"):
        solve_offsets(patches, pos[:, :1], mask)
    with pytest.raises(ValueError, match="must match"):
        solve_offsets(patches, pos[:-1], mask)
    with pytest.raises(ValueError, match="mask must have the patch shape"):
        solve_offsets(patches, pos, mask[:-1])
    with pytest.raises(ValueError, match="mask is empty"):
        solve_offsets(patches, pos, np.zeros_like(mask))
    with pytest.raises(ValueError, match="real numbers"):
        solve_offsets(patches.astype(complex), pos, mask)
    bad_pos = pos.copy()
    bad_pos[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        solve_offsets(patches, bad_pos, mask)
    with pytest.raises(ValueError, match="single patch"):
        solve_offsets(patches[:1], pos[:1], mask)
    with pytest.raises(ValueError, match="scan step is too large"):
        solve_offsets(patches[:4], np.array([[0.0, 0.0], [0.0, 20.0], [20.0, 0.0], [20.0, 20.0]]), mask)
    with pytest.raises(ValueError, match="min_overlap"):
        solve_offsets(patches, pos, mask, min_overlap=1.5)
    with pytest.raises(ValueError, match="device"):
        solve_offsets(patches, pos, mask, device="tpu")
