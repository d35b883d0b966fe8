"""Placement: bilinear splatting, the default origin and canvas, patches outside the canvas."""

import numpy as np
import pytest
from _stitching_data import H, W

from py4dstem_deepcdi.stitching import stitch
from py4dstem_deepcdi.stitching.place import accumulate, default_canvas_shape, default_origin


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


def test_default_origin_and_canvas_shape():
    pos = np.array([[3.5, -2.25], [10.0, 4.0]])
    origin = default_origin(pos, 8, 6)
    np.testing.assert_array_equal(origin, [4 - 3, 3 + 3])  # the smallest position lands on (h//2, w//2) + fraction
    # the largest position's window: rows up to 10 + 1 + 3 = 14, cols up to 4 + 6 + 2 = 12
    assert default_canvas_shape(pos, origin, 8, 6) == (15, 13)


def test_accumulate_sums_offsets_and_skips_patches_outside():
    coords = np.array([[0, 0], [1, 1]])  # two mask pixels of a 2x2 patch
    values = np.array([[1.0, 2.0], [5.0, 6.0], [7.0, 8.0]])
    pos = np.array([[1.0, 1.0], [1.0, 2.0], [100.0, 100.0]])
    offsets = np.array([0.5, -1.0, 0.0])
    total, weight, n_outside = accumulate(np, values, coords, pos, np.zeros(2), (4, 4), (2, 2), offsets)
    assert n_outside == 1
    # patch 0: pixel (0, 0) at canvas (0, 0), pixel (1, 1) at (1, 1); patch 1 one column to the right
    expected_total = np.zeros((4, 4))
    expected_total[0, 0], expected_total[1, 1] = 1.5, 2.5
    expected_total[0, 1] += 4.0
    expected_total[1, 2] += 5.0
    np.testing.assert_allclose(total, expected_total)
    np.testing.assert_array_equal(weight, expected_total != 0)
