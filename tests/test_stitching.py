"""Stitching of phase patches (paper Eq. 2): offsets, relaxation, tilts, sub-pixel placement, input checks."""

import math
import warnings

import numpy as np
import pytest

from py4dstem_deepcdi.stitching import OffsetSolution, StitchResult, solve_offsets, stitch

H = W = 32
RADIUS = 6.0


def circular_mask(radius=RADIUS, size=H):
    yy, xx = np.mgrid[:size, :size]
    return (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius**2


class PlaneWaves:
    """A smooth random phase object (rad): a sum of plane waves with periods >= ``min_period`` pixels."""

    def __init__(self, rng, n_waves=12, min_period=24.0):
        kmax = 2 * math.pi / min_period
        self.k = rng.uniform(-kmax, kmax, (n_waves, 2))
        self.amp = rng.uniform(0.3, 1.0, n_waves) / math.sqrt(n_waves / 2)
        self.phase = rng.uniform(0, 2 * math.pi, n_waves)

    def __call__(self, y, x):
        out = np.zeros(np.broadcast(y, x).shape)
        for (ky, kx), a, ph in zip(self.k, self.amp, self.phase):
            out += a * np.cos(ky * y + kx * x + ph)
        return out


def cut_patches(obj, positions, mask):
    """Exact patches of ``obj`` at (sub-pixel) positions: patch pixel u sits at position + u - centre. NaN outside."""
    uy, ux = np.nonzero(mask)
    uy, ux = uy - H // 2, ux - W // 2
    patches = np.full((len(positions), H, W), np.nan)
    patches[:, mask] = obj(positions[:, :1] + uy[None, :], positions[:, 1:] + ux[None, :])
    return patches


def truth_on_canvas(obj, result, where):
    rr, cc = np.nonzero(where)
    return rr, cc, obj(rr - result.origin_px[0], cc - result.origin_px[1])


def integer_scan(rng, n=14, step=2):
    """A raster with random integer jitter: integer positions, irregular neighbourhoods."""
    gy, gx = np.mgrid[:n, :n] * step
    pos = np.stack([gy.ravel(), gx.ravel()], axis=1) + rng.integers(-1, 2, (n * n, 2))
    return pos.astype(np.float64) + 40.0


@pytest.fixture
def exact_data(rng):
    obj = PlaneWaves(rng, min_period=12.0)
    mask = circular_mask()
    pos = integer_scan(rng)
    patches = cut_patches(obj, pos, mask)
    offsets = rng.uniform(-math.pi, math.pi, len(pos))
    patches += offsets[:, None, None]
    return obj, mask, pos, patches, offsets


# ----------------------------------------------------------------------------------------------------------------
# exact recovery


def test_lsq_recovers_offsets_and_object_exactly(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    sol = solve_offsets(patches, pos, mask, tol=1e-12, device="cpu")
    assert isinstance(sol, OffsetSolution)
    assert isinstance(sol.offsets, np.ndarray) and sol.offsets.shape == (len(pos),) and sol.tilts is None
    err = sol.offsets + offsets  # the solved offsets undo the added ones, up to one constant
    assert np.ptp(err) < 1e-9
    assert abs(sol.offsets.mean()) < 1e-12  # gauge: zero-mean offsets
    assert sol.converged and sol.relative_residual < 1e-11
    assert sol.n_components == 1 and sol.n_pairs > 5 * len(pos)
    assert sol.energy_before > 1e3 and sol.energy_after < 1e-9 * sol.energy_before

    res = stitch(patches, pos, mask, tol=1e-12, device="cpu")
    assert isinstance(res, StitchResult)
    covered = res.coverage > 0
    assert np.isnan(res.image[~covered]).all() and np.isfinite(res.image[covered]).all()
    rr, cc, truth = truth_on_canvas(obj, res, covered)
    diff = res.image[rr, cc] - truth
    assert np.abs(diff - diff.mean()).max() < 1e-9  # well within the 1e-5 asked for
    np.testing.assert_allclose(res.offsets, sol.offsets, atol=1e-12)


def test_default_canvas_origin_and_coverage(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    res = stitch(patches, pos, mask)
    # the smallest position lands on (h//2, w//2): the top-left patch pixel is canvas row/col 0
    np.testing.assert_array_equal(res.origin_px, [H // 2 - pos[:, 0].min(), W // 2 - pos[:, 1].min()])
    # just large enough for the full patch windows of the extreme positions
    last = pos.max(axis=0) + res.origin_px + np.array([H - 1 - H // 2, W - 1 - W // 2])
    assert res.image.shape == tuple(int(v) + 1 for v in last)
    rows, cols = np.nonzero(res.coverage)
    assert rows.min() == H // 2 - RADIUS and cols.min() == W // 2 - RADIUS  # the mask's first row/column
    # with integer positions and the mask as weights, coverage counts the patches covering each pixel
    k = 7
    centre = (pos[k] + res.origin_px).astype(int)
    d2 = ((pos - pos[k]) ** 2).sum(axis=1)
    assert res.coverage[centre[0], centre[1]] == np.sum(d2 <= RADIUS**2)
    # a position maps back: the image at a patch centre is that patch's corrected centre pixel (+ a constant)
    rr, cc, truth = truth_on_canvas(obj, res, res.coverage > 0)
    const = np.mean(res.image[rr, cc] - truth)
    assert res.image[centre[0], centre[1]] == pytest.approx(patches[k, H // 2, W // 2] + res.offsets[k], abs=1e-6)
    assert res.image[centre[0], centre[1]] - const == pytest.approx(obj(pos[k, 0], pos[k, 1]), abs=1e-6)


def test_float32_patches_and_nan_outside_mask(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    p32 = patches.astype(np.float32)  # NaN outside the mask must be ignored
    assert np.isnan(p32[:, ~mask]).all()
    res = stitch(p32, pos, mask)
    rr, cc, truth = truth_on_canvas(obj, res, res.coverage > 0)
    diff = res.image[rr, cc] - truth
    assert res.image.dtype == np.float64
    assert np.abs(diff - diff.mean()).max() < 1e-5  # float32 input precision


def test_probe_weights_and_given_offsets(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    yy, xx = np.mgrid[:H, :W]
    probe = np.exp(-((yy - H // 2) ** 2 + (xx - W // 2) ** 2) / (2 * 4.0**2))
    res = stitch(patches, pos, mask, offsets=-offsets, weights=probe)
    assert res.solution is None
    np.testing.assert_allclose(res.offsets, -offsets)
    rr, cc, truth = truth_on_canvas(obj, res, res.coverage > 0)
    assert np.abs(res.image[rr, cc] - truth).max() < 1e-12  # exact offsets: no constant left
    # coverage is the accumulated probe weight
    plain = stitch(patches, pos, mask, offsets=-offsets)
    assert res.coverage.max() < plain.coverage.max()


# ----------------------------------------------------------------------------------------------------------------
# relaxation


def test_relaxation_reduces_energy_and_lsq_is_optimal(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    energies = []
    for n_iter in (0, 3, 30):
        sol = solve_offsets(patches, pos, mask, method="relaxation", n_iter=n_iter, step=0.1)
        assert sol.method == "relaxation" and sol.iterations == n_iter
        energies.append(sol.energy_after)
    assert energies[0] == pytest.approx(sol.energy_before)  # no sweep: offsets stay zero
    assert energies[0] > energies[1] > energies[2]  # the paper's 3 sweeps at step 0.1 help, more sweeps help more
    lsq = solve_offsets(patches, pos, mask)
    assert lsq.energy_after <= energies[2]
    res = stitch(patches, pos, mask, method="relaxation", n_iter=3)
    assert res.solution.method == "relaxation" and np.isfinite(res.image[res.coverage > 0]).all()


# ----------------------------------------------------------------------------------------------------------------
# sub-pixel positions


def test_rotated_scan_with_subpixel_positions(rng):
    """A rotated raster (step 1.5 px, 23 degrees): every relative position is fractional.

    Two approximations remain with exact data. (1) The overlap masks use the relative positions rounded to whole
    pixels; the solver corrects the means to first order with the mean gradient over the overlap
    (``delta . grad phi``, |delta| <= 0.5 px per axis), leaving about |hessian phi| delta^2 / 2 per pair, averaged
    over ~100 neighbours. (2) Bilinear splatting: a canvas pixel is a weighted mean of samples within 1 px; away
    from the coverage edge the first-order errors of the many overlapping patches (all fractional offsets) cancel
    and about |laplacian phi| / 8 remains. This object has periods >= 24 px (rms gradient ~0.13 rad/px, curvature
    <~ 0.12 rad/px^2): expect offsets within ~1e-3 rad and image errors ~0.01 rad; we allow 0.005 rad for the
    offsets, 0.03 rad max and 0.01 rad rms for the image where the coverage is at least half its maximum.
    """
    obj = PlaneWaves(rng, min_period=24.0)
    mask = circular_mask()
    pos = rotated_lattice(n=24)
    assert np.ptp(pos - np.rint(pos)) > 0.5
    patches = cut_patches(obj, pos, mask)
    offsets = rng.uniform(-math.pi, math.pi, len(pos))
    patches += offsets[:, None, None]
    res = stitch(patches, pos, mask)
    err = res.offsets + offsets
    assert np.ptp(err) < 0.005
    interior = res.coverage >= 0.5 * res.coverage.max()
    rr, cc, truth = truth_on_canvas(obj, res, interior)
    diff = res.image[rr, cc] - truth
    diff -= diff.mean()
    assert np.abs(diff).max() < 0.03
    assert np.sqrt(np.mean(diff**2)) < 0.01
    # the same object and geometry at integer positions is exact: the error above is the sub-pixel approximation
    pos_int = np.rint(pos)
    exact = stitch(cut_patches(obj, pos_int, mask) + offsets[:, None, None], pos_int, mask, tol=1e-12)
    rr, cc, truth = truth_on_canvas(obj, exact, exact.coverage > 0)
    diff = exact.image[rr, cc] - truth
    assert np.abs(diff - diff.mean()).max() < 1e-8


def rotated_lattice(n=16, step=1.5, degrees=23.0, offset=0.3):
    theta = math.radians(degrees)
    gy, gx = np.mgrid[:n, :n] * step
    pos = np.stack([math.cos(theta) * gy - math.sin(theta) * gx, math.sin(theta) * gy + math.cos(theta) * gx], -1)
    return pos.reshape(-1, 2) + offset


@pytest.mark.parametrize("tilt", [False, True])
def test_scan_order_does_not_matter(rng, tilt):
    """A raster is indexed as a lattice; shuffled, the same positions go through the generic cell search.

    Both must find the same pairs and the same solution (this also checks the tilt operator's two code paths).
    """
    obj = PlaneWaves(rng, min_period=16.0)
    mask = circular_mask()
    pos = rotated_lattice(n=14)
    patches = cut_patches(obj, pos, mask) + rng.uniform(-3, 3, len(pos))[:, None, None]
    perm = rng.permutation(len(pos))
    a = solve_offsets(patches, pos, mask, tilt=tilt, tol=1e-12)
    b = solve_offsets(patches[perm], pos[perm], mask, tilt=tilt, tol=1e-12)
    assert a.n_pairs == b.n_pairs
    assert a.energy_before == pytest.approx(b.energy_before, rel=1e-12)
    np.testing.assert_allclose(b.offsets, a.offsets[perm], atol=1e-8)
    if tilt:
        np.testing.assert_allclose(b.tilts, a.tilts[perm], atol=1e-9)


def test_jittered_subpixel_scan(rng):
    """Irregular sub-pixel positions (no lattice): the generic search with per-pair rounding and correction."""
    obj = PlaneWaves(rng, min_period=24.0)
    mask = circular_mask()
    gy, gx = np.mgrid[:20, :20] * 1.7
    pos = np.stack([gy.ravel(), gx.ravel()], axis=1) + rng.uniform(-0.4, 0.4, (400, 2))
    patches = cut_patches(obj, pos, mask)
    offsets = rng.uniform(-math.pi, math.pi, len(pos))
    res = stitch(patches + offsets[:, None, None], pos, mask)
    err = res.offsets + offsets
    assert np.ptp(err) < 0.005  # same budget as the rotated raster (see above)
    interior = res.coverage >= 0.5 * res.coverage.max()
    rr, cc, truth = truth_on_canvas(obj, res, interior)
    diff = res.image[rr, cc] - truth
    diff -= diff.mean()
    assert np.abs(diff).max() < 0.03 and np.sqrt(np.mean(diff**2)) < 0.01


def test_subpixel_placement_is_bilinear():
    """Two patches of a constant: splatting spreads each pixel over 4 neighbours with bilinear weights."""
    mask = np.zeros((H, W), dtype=bool)
    mask[H // 2, W // 2] = True  # one valid pixel per patch
    patches = np.zeros((2, H, W))
    patches[0, H // 2, W // 2] = 1.0
    patches[1, H // 2, W // 2] = 3.0
    pos = np.array([[10.25, 20.5], [10.25, 20.5]])
    res = stitch(patches, pos, mask, offsets=np.zeros(2), origin_px=(0, 0), canvas_shape=(30, 30))
    cov = res.coverage
    np.testing.assert_allclose(cov[10:12, 20:22], 2 * np.array([[0.75 * 0.5, 0.75 * 0.5], [0.25 * 0.5, 0.25 * 0.5]]))
    assert cov.sum() == pytest.approx(2.0)
    np.testing.assert_allclose(res.image[10:12, 20:22], 2.0)  # the weighted mean of 1 and 3
    assert np.isnan(res.image[0, 0])
    filled = stitch(patches, pos, mask, offsets=np.zeros(2), origin_px=(0, 0), canvas_shape=(30, 30), fill_value=0.0)
    assert filled.image[0, 0] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# tilts


def _tilt_data(rng, obj, mask, pos):
    patches = cut_patches(obj, pos, mask)
    offsets = rng.uniform(-math.pi, math.pi, len(pos))
    tilts = rng.uniform(-0.05, 0.05, (len(pos), 2))
    # true tilts with zero mean and no linear trend across the scan: the overlaps cannot see those (see gauge)
    design = np.stack([np.ones(len(pos)), pos[:, 0], pos[:, 1]], axis=1)
    tilts -= design @ np.linalg.lstsq(design, tilts, rcond=None)[0]
    yy, xx = np.mgrid[:H, :W]
    ramps = tilts[:, 0, None, None] * (yy - H // 2) + tilts[:, 1, None, None] * (xx - W // 2)
    patches += offsets[:, None, None] + ramps
    return patches, offsets, tilts


def test_tilt_recovers_per_patch_ramps(rng):
    obj = PlaneWaves(rng, min_period=12.0)
    mask = circular_mask()
    pos = integer_scan(rng, n=12)
    patches, offsets, tilts = _tilt_data(rng, obj, mask, pos)

    plain = solve_offsets(patches, pos, mask)
    sol = solve_offsets(patches, pos, mask, tilt=True, tilt_gauge="zero_mean", tol=1e-12)
    assert sol.tilts.shape == (len(pos), 2) and sol.tilt_gauge == "zero_mean"
    assert sol.energy_after < 1e-9 * sol.energy_before
    assert plain.energy_after > 1e3 * (sol.energy_after + 1e-12)  # offsets alone cannot explain the ramps
    np.testing.assert_allclose(sol.tilts, -tilts, atol=1e-9)
    err = sol.offsets + offsets
    assert np.ptp(err) < 1e-7

    res = stitch(patches, pos, mask, offsets=sol.offsets, tilts=sol.tilts)
    rr, cc, truth = truth_on_canvas(obj, res, res.coverage > 0)
    diff = res.image[rr, cc] - truth
    assert np.abs(diff - diff.mean()).max() < 1e-7

    # "detrend" (default) differs only by a global linear ramp (the unobservable mode it fixes differently)
    det = stitch(patches, pos, mask, tilt=True, tol=1e-12)
    assert det.solution.tilt_gauge == "detrend"
    dt = det.tilts + tilts
    np.testing.assert_allclose(dt - dt.mean(axis=0), 0.0, atol=1e-8)
    rr, cc, truth = truth_on_canvas(obj, det, det.coverage > 0)
    diff = det.image[rr, cc] - truth
    design = np.stack([np.ones_like(rr), rr, cc], axis=1).astype(float)
    resid = diff - design @ np.linalg.lstsq(design, diff, rcond=None)[0]
    assert np.abs(resid).max() < 1e-7


def test_tilt_detrend_removes_systematic_tilt_bias(rng):
    """Every patch carries the same spurious tilt (a network bias): offsets alone turn it into an image-wide ramp."""
    obj = PlaneWaves(rng, min_period=12.0)
    mask = circular_mask()
    pos = integer_scan(rng, n=12)
    patches = cut_patches(obj, pos, mask)
    bias = np.array([0.03, -0.02])  # rad/pixel
    yy, xx = np.mgrid[:H, :W]
    patches += bias[0] * (yy - H // 2) + bias[1] * (xx - W // 2)

    def ramp_of(res):
        rr, cc, truth = truth_on_canvas(obj, res, res.coverage > 0)
        design = np.stack([np.ones_like(rr), rr, cc], axis=1).astype(float)
        return np.linalg.lstsq(design, res.image[rr, cc] - truth, rcond=None)[0][1:]

    plain = stitch(patches, pos, mask)
    np.testing.assert_allclose(ramp_of(plain), bias, atol=2e-3)  # the bias became a ramp across the image
    fixed = stitch(patches, pos, mask, tilt=True)
    # one common correction; "detrend" fixes the unobservable common tilt so that the corrected patch means have no
    # linear trend across the scan: the tilts are -bias minus the trend of the object's own patch means
    means_true = np.nanmean(np.where(mask, cut_patches(obj, pos, mask), np.nan), axis=(1, 2))
    design = np.stack([np.ones(len(pos)), pos[:, 0], pos[:, 1]], axis=1)
    trend_true = np.linalg.lstsq(design, means_true, rcond=None)[0][1:]
    np.testing.assert_allclose(fixed.tilts, np.broadcast_to(-bias - trend_true, fixed.tilts.shape), atol=1e-6)
    corrected_means = fixed.offsets + np.nanmean(np.where(mask, patches, np.nan), axis=(1, 2))
    assert np.abs(np.linalg.lstsq(design, corrected_means, rcond=None)[0][1:]).max() < 1e-9
    # with "zero_mean" the common tilt is trusted: the bias stays (as a ramp) and the tilts are zero
    kept = solve_offsets(patches, pos, mask, tilt=True, tilt_gauge="zero_mean")
    assert np.abs(kept.tilts).max() < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# structure of the problem


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


def test_pairs_are_counted_by_rounded_shift():
    """Three patches on a line, 5 px apart; the outer two (10 px) overlap by less than 25 % of a radius-6 disk."""
    mask = circular_mask()
    pos = np.array([[50.0, 50.0], [50.0, 55.0], [50.0, 60.0]])
    patches = np.zeros((3, H, W))
    sol = solve_offsets(patches, pos, mask)
    assert sol.n_pairs == 2
    assert solve_offsets(patches, pos, mask, min_overlap=0.05).n_pairs == 3
    # 4.6 px rounds to 5: same pairs, and the paper's E counts each overlapping pair twice
    patches[1] += 1.0
    sol = solve_offsets(patches, pos + np.array([[0, 0], [0, -0.4], [0, -0.8]]), mask)
    assert sol.n_pairs == 2
    assert sol.energy_before == pytest.approx(4.0)  # (0 - 1)^2 for 2 pairs x 2 orderings
    assert sol.energy_after == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(sol.offsets, [1 / 3, -2 / 3, 1 / 3], atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# input checks


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
    bad = patches.copy()
    bad[3, H // 2, W // 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        stitch(bad, pos, mask)
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
    with pytest.raises(ValueError, match="method"):
        stitch(patches, pos, mask, method="magic")
    with pytest.raises(ValueError, match="offsets must have shape"):
        stitch(patches, pos, mask, offsets=np.zeros(3))
    with pytest.raises(ValueError, match="weights must have the patch shape"):
        stitch(patches, pos, mask, weights=np.ones((3, 3)))
    with pytest.raises(ValueError, match="tilts are applied only together with given offsets"):
        stitch(patches, pos, mask, tilts=np.zeros((len(pos), 2)))
    with pytest.raises(ValueError, match="device"):
        solve_offsets(patches, pos, mask, device="tpu")
    # a single patch is fine when the offsets are given
    one = stitch(patches[:1], pos[:1], mask, offsets=np.zeros(1))
    assert np.isfinite(one.image[one.coverage > 0]).all()


def test_patches_outside_a_given_canvas_are_skipped(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    far = pos.copy()
    far[0] += 1000.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res_all = stitch(patches, pos, mask, offsets=-offsets)
    with pytest.warns(RuntimeWarning, match="outside the canvas"):
        res = stitch(patches, far, mask, offsets=-offsets, canvas_shape=res_all.image.shape,
                     origin_px=res_all.origin_px)
    assert res.n_outside == 1
    rr, cc, truth = truth_on_canvas(obj, res, res.coverage > 0)
    assert np.abs(res.image[rr, cc] - truth).max() < 1e-12


# ----------------------------------------------------------------------------------------------------------------
# solver behaviour and backends


def test_preconditioner_keeps_iterations_low(rng):
    """Two-level preconditioning: 16 iterations for 64x64 and for 128x128 scans alike (measured); Jacobi alone needed
    33 and 63, doubling with the side of the scan."""
    mask = circular_mask()
    gy, gx = np.mgrid[:64, :64]
    pos = np.stack([gy.ravel(), gx.ravel()], axis=1).astype(np.float64)
    patches = np.zeros((len(pos), H, W), dtype=np.float32)
    patches += rng.uniform(-3, 3, len(pos)).astype(np.float32)[:, None, None]
    sol = solve_offsets(patches, pos, mask)
    assert sol.converged and sol.iterations <= 25
    sol = solve_offsets(patches[:1024], pos[:1024], mask, tilt=True)
    assert sol.converged and sol.iterations <= 40


def test_gpu_matches_cpu(exact_data):
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except Exception:  # noqa: BLE001
        pytest.skip("no CUDA GPU")
    obj, mask, pos, patches, offsets = exact_data
    for tilt in (False, True):
        cpu = stitch(patches, pos, mask, tilt=tilt)
        gpu = stitch(cp.asarray(patches), pos, mask, tilt=tilt, device="gpu")
        assert isinstance(gpu.image, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(gpu.offsets), cpu.offsets, atol=1e-6)
        np.testing.assert_allclose(cp.asnumpy(gpu.image), cpu.image, atol=1e-6, equal_nan=True)
