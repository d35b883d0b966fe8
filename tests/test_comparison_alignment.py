"""The deep-CDI canvas grid, fields of view, the ground truth's frame, resampling and registration
(comparison/alignment.py)."""

import numpy as np
import pytest
from comparison_cases import dataset, finished_reconstruction, geometry, reconstruction
from scipy.ndimage import gaussian_filter, shift

from py4dstem_deepcdi.comparison.alignment import (
    MIN_FOV_PX,
    CanvasGrid,
    common_box,
    deep_cdi_field_of_view,
    epie_image,
    inside_array,
    inside_hull,
    largest_rectangle,
    register,
    sample,
    truth_frame,
)
from py4dstem_deepcdi.simulation import simulate_dataset


def test_largest_rectangle():
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3:11] = True
    mask[0:10, 5] = True
    assert largest_rectangle(mask) == (2, 8, 3, 11)
    assert largest_rectangle(np.zeros((4, 4), bool)) == (0, 0, 0, 0)
    # of equal areas the squarest: a 2×8 strip and a 4×4 square
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:8] = True
    mask[5:9, 5:9] = True
    assert largest_rectangle(mask) == (5, 9, 5, 9)


def test_inside_hull_and_array():
    square = np.array([[0, 0], [0, 4], [4, 0], [4, 4]], float)
    grid = np.array([[2, 2], [0.5, 3.9], [5, 2], [-0.1, 0]])
    np.testing.assert_array_equal(inside_hull(square, grid), [True, True, False, False])
    with pytest.raises(ValueError, match="collinear"):
        inside_hull(np.array([[0, 0], [1, 1], [2, 2]], float), grid)
    np.testing.assert_array_equal(inside_array(grid, (5, 5)), [True, True, False, False])


def test_common_box():
    ok = np.zeros((12, 12), bool)
    ok[1:11, 2:12] = True
    assert common_box(ok.ravel(), (12, 12), "too small") == (1, 11, 2, 12)
    ok[:] = False
    ok[:MIN_FOV_PX - 1, :] = True
    with pytest.raises(ValueError, match="too small"):
        common_box(ok.ravel(), (12, 12), "too small")


def test_sample_is_exact_on_pixels_and_linear_between():
    i, j = np.meshgrid(np.arange(8), np.arange(9), indexing="ij")
    plane = 1.0 + 0.5 * i - 0.25 * j
    coords = np.array([[2.0, 3.5, 6.25], [1.0, 4.5, 7.0]])
    np.testing.assert_allclose(sample(plane, coords, order=1), 1.0 + 0.5 * coords[0] - 0.25 * coords[1], atol=1e-12)
    np.testing.assert_allclose(sample(plane, np.array([[2.0, 5.0], [1.0, 7.0]])), [plane[2, 1], plane[5, 7]], atol=1e-9)
    wave = np.exp(1j * plane)
    np.testing.assert_allclose(sample(wave, np.array([[3.0], [4.0]])), wave[3, 4], atol=1e-12)


def test_register_finds_a_known_shift(rng):
    reference = gaussian_filter(rng.normal(size=(64, 64)), 2.0)
    moving = shift(reference, (1.5, -0.75), order=3, mode="wrap")  # moving(r) = reference(r - s)
    found = register(reference, moving)
    np.testing.assert_allclose(found, (1.5, -0.75), atol=0.05)  # moving(r + s) ≈ reference(r)


def test_canvas_grid_maps_positions_to_their_pixels():
    recon = finished_reconstruction()
    grid = CanvasGrid.of(recon)
    assert grid.shape == recon.object_phase.shape and len(grid.pixels) == grid.shape[0] * grid.shape[1]
    np.testing.assert_allclose(recon.positions / grid.sampling + grid.origin_px, recon.positions_px, atol=1e-9)
    np.testing.assert_allclose(grid.points_A, (grid.pixels - grid.origin_px) * grid.sampling)
    box = (2, 6, 3, 9)
    assert grid.box_points_A(box).shape == (4, 6, 2)
    np.testing.assert_allclose(grid.box_points_A(box)[0, 0], (np.array([2, 3]) - grid.origin_px) * grid.sampling)


def test_deep_cdi_field_of_view_lies_inside_the_scan():
    recon = finished_reconstruction()
    grid, ok = deep_cdi_field_of_view(recon, 0.5)
    inside = grid.pixels[ok]
    lo, hi = recon.positions_px.min(0), recon.positions_px.max(0)
    assert np.all(inside >= lo - 1e-9) and np.all(inside <= hi + 1e-9)
    assert ok.sum() >= MIN_FOV_PX**2
    _, strict = deep_cdi_field_of_view(recon, 0.9)
    assert strict.sum() <= ok.sum() and not np.any(strict & ~ok)


def test_truth_frame_of_a_dataset_and_of_tuples():
    recon, ds = finished_reconstruction(), dataset()
    frame = truth_frame(ds, recon)
    np.testing.assert_allclose(frame.delta, (ds.positions - recon.positions).mean(0))
    assert frame.sampling == (ds.sampling, ds.sampling)
    # the truth pixel of each probe position is its position in the truth's own frame
    np.testing.assert_allclose(frame.to_pixels(recon.positions), ds.positions / ds.sampling, atol=1e-9)
    offset = truth_frame((ds.phase, ds.sampling, frame.delta), recon)
    np.testing.assert_allclose(offset.delta, frame.delta)
    assert truth_frame(None, recon) is None
    with pytest.raises(TypeError, match="ground_truth"):
        truth_frame(3.0, recon)
    with pytest.raises(ValueError, match="2-D"):
        truth_frame((ds.phase[0], ds.sampling, ds.positions), recon)
    with pytest.raises(ValueError, match="positions"):
        truth_frame((ds.phase, ds.sampling, ds.positions[:10]), recon)
    with pytest.raises(ValueError, match="ground-truth positions"):
        truth_frame((ds.phase, ds.sampling, ds.positions[:, ::-1]), recon)


def test_truth_frame_of_a_subsampled_reconstruction():
    geom = geometry()
    ds = simulate_dataset(geom, scan_shape=(12, 12), scan_step=0.5, electrons=1e6, seed=3)
    recon = reconstruction(ds, geom, subsample=2, reconstruct=False).preprocess()
    frame = truth_frame(ds, recon)  # the truth lists all 144 positions, the reconstruction every second: 36
    np.testing.assert_allclose(frame.to_pixels(recon.positions),
                               ds.positions.reshape(12, 12, 2)[::2, ::2].reshape(-1, 2) / ds.sampling, atol=1e-9)


def test_epie_image_moves_by_the_shift():
    class Frame:  # an ePIE result's frame: 0.5 Å pixels, 0 Å at object pixel (4, 4)
        sampling = (0.5, 0.5)

        def to_pixels(self, points_A):
            return np.asarray(points_A) / 0.5 + 4.0

    i, j = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    obj = np.exp(1j * 0.01 * (i + 2 * j))
    points_A = np.array([[[1.0, 2.0]]])  # object pixel (6, 8)
    assert epie_image(Frame(), obj, points_A, np.zeros(2), (0.25, 0.25))[0, 0] == pytest.approx(0.01 * (6 + 16))
    # a shift of (2, -2) canvas pixels of 0.25 Å = (1, -1) object pixels
    moved = epie_image(Frame(), obj, points_A, np.array([2.0, -2.0]), (0.25, 0.25))[0, 0]
    assert moved == pytest.approx(0.01 * (7 + 14))
