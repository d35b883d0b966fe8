"""stitch(): offsets solved or given, the averaged image on the canvas, sub-pixel scans, input checks, GPU."""

import math
import warnings

import numpy as np
import pytest
from _stitching_data import (
    RADIUS,
    H,
    PlaneWaves,
    W,
    circular_mask,
    cut_patches,
    rotated_lattice,
    truth_on_canvas,
)
from _stitching_data import exact_data as make_exact_data

from py4dstem_deepcdi.stitching import StitchOptions, StitchResult, solve_offsets, stitch


@pytest.fixture
def exact_data(rng):
    return make_exact_data(rng)


def test_lsq_stitches_the_object_exactly(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    sol = solve_offsets(patches, pos, mask, tol=1e-12)
    res = stitch(patches, pos, mask, tol=1e-12, device="cpu")
    assert isinstance(res, StitchResult)
    covered = res.coverage > 0
    assert np.isnan(res.image[~covered]).all() and np.isfinite(res.image[covered]).all()
    rr, cc, truth = truth_on_canvas(obj, res, covered)
    diff = res.image[rr, cc] - truth
    assert np.abs(diff - diff.mean()).max() < 1e-9  # well within the 1e-5 asked for
    np.testing.assert_allclose(res.offsets, sol.offsets, atol=1e-12)
    assert res.solution.n_pairs == sol.n_pairs and res.solution.n_components == 1


def test_options_object_and_keywords_agree(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    by_keyword = stitch(patches, pos, mask, method="relaxation", min_overlap=0.3, n_iter=5)
    by_options = stitch(patches, pos, mask, StitchOptions(method="relaxation", min_overlap=0.3, n_iter=5))
    mixed = stitch(patches, pos, mask, StitchOptions(method="relaxation", n_iter=1), min_overlap=0.3, n_iter=5)
    for res in (by_options, mixed):
        np.testing.assert_array_equal(res.offsets, by_keyword.offsets)
        np.testing.assert_array_equal(res.image, by_keyword.image)
    assert by_keyword.solution.method == "relaxation" and by_keyword.solution.iterations == 5


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
    # with integer positions, coverage counts the patches covering each pixel
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


def test_given_offsets_are_applied_exactly(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    res = stitch(patches, pos, mask, offsets=-offsets)
    assert res.solution is None
    np.testing.assert_allclose(res.offsets, -offsets)
    rr, cc, truth = truth_on_canvas(obj, res, res.coverage > 0)
    assert np.abs(res.image[rr, cc] - truth).max() < 1e-12  # exact offsets: no constant left


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


def test_jittered_subpixel_scan(rng):
    """Irregular sub-pixel positions (no lattice): the cell search with per-pair rounding and correction."""
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


def test_bad_inputs_raise_clear_errors(exact_data):
    obj, mask, pos, patches, offsets = exact_data
    bad = patches.copy()
    bad[3, H // 2, W // 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        stitch(bad, pos, mask)
    with pytest.raises(ValueError, match="method"):
        stitch(patches, pos, mask, method="magic")
    with pytest.raises(ValueError, match="offsets must have shape"):
        stitch(patches, pos, mask, offsets=np.zeros(3))
    with pytest.raises(ValueError, match="offsets contain NaN"):
        stitch(patches, pos, mask, offsets=np.full(len(pos), np.nan))
    with pytest.raises(ValueError, match="origin_px must be two finite numbers"):
        stitch(patches, pos, mask, offsets=-offsets, origin_px=(1.0, np.nan))
    with pytest.raises(ValueError, match="canvas_shape must be two positive integers"):
        stitch(patches, pos, mask, offsets=-offsets, canvas_shape=(0, 10))
    for removed in ("weights", "tilt", "tilts", "tilt_gauge"):  # per-pixel weights and per-patch tilts are gone
        with pytest.raises(TypeError, match=f"stitch\\(\\) got unexpected keyword argument\\(s\\) '{removed}'"):
            stitch(patches, pos, mask, **{removed: None})
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


def test_gpu_matches_cpu(exact_data):
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except Exception:  # noqa: BLE001
        pytest.skip("no CUDA GPU")
    obj, mask, pos, patches, offsets = exact_data
    for method in ("lsq", "relaxation"):
        cpu = stitch(patches, pos, mask, method=method)
        gpu = stitch(cp.asarray(patches), pos, mask, method=method, device="gpu")
        assert isinstance(gpu.image, cp.ndarray)
        assert gpu.solution.iterations == cpu.solution.iterations
        np.testing.assert_allclose(cp.asnumpy(gpu.offsets), cpu.offsets, atol=1e-6)
        np.testing.assert_allclose(cp.asnumpy(gpu.image), cpu.image, atol=1e-6, equal_nan=True)
    # the sub-pixel cell search (no lattice) on the GPU
    rng = np.random.default_rng(3)
    jitter = pos + rng.uniform(-0.4, 0.4, pos.shape)
    cpu = stitch(patches, jitter, mask)
    gpu = stitch(cp.asarray(patches), jitter, mask, device="gpu")
    np.testing.assert_allclose(cp.asnumpy(gpu.offsets), cpu.offsets, atol=1e-6)
