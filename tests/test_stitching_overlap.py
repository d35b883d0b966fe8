"""Overlap geometry of the mask: counts, qualifying shifts, region weights, gradient weights, cliques."""

import numpy as np
from _stitching_data import H, W, circular_mask

from py4dstem_deepcdi.stitching.overlap import overlap_counts, overlap_geometry


def _brute_count(mask, d):
    h, w = mask.shape
    shifted = np.zeros_like(mask)
    src = mask[max(0, -d[0]) : h - max(0, d[0]), max(0, -d[1]) : w - max(0, d[1])]
    shifted[max(0, d[0]) : h - max(0, -d[0]), max(0, d[1]) : w - max(0, -d[1])] = src
    return int((mask & shifted).sum())


def test_overlap_counts_match_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((7, 9)) < 0.6
    counts = overlap_counts(mask)
    assert counts.shape == (13, 17) and counts[6, 8] == mask.sum()
    for d in [(0, 0), (1, 0), (0, -3), (-4, 5), (6, 8), (-6, -8)]:
        assert counts[d[0] + 6, d[1] + 8] == _brute_count(mask, d)


def test_geometry_of_a_disk():
    mask = circular_mask()
    geom = overlap_geometry(np, mask, 0.25, np.float64)
    area = int(mask.sum())
    assert geom.area == area == 113 and (geom.h, geom.w) == (H, W)
    assert len(geom.shifts) == 177  # the bench's count for radius 6 px and min_overlap 0.25
    for s, d in enumerate(geom.shifts):
        assert _brute_count(mask, d) >= 0.25 * area
        assert geom.lut[d[0] + H - 1, d[1] + W - 1] == s
        np.testing.assert_array_equal(geom.shifts[geom.neg[s]], -d)
    np.testing.assert_allclose(geom.overlap.sum(axis=0), 1.0)  # mean weights
    # the largest square of shifts that all qualify: |d| <= 5 per axis (diagonal 5 * sqrt(2) = 7.1 px)
    assert geom.clique == 5
    assert len(overlap_geometry(np, mask, 0.9, np.float64).shifts) < len(geom.shifts)


def test_gradient_weights_are_exact_for_a_linear_phase():
    mask = circular_mask()
    geom = overlap_geometry(np, mask, 0.25, np.float64)
    yy, xx = np.nonzero(mask)
    n_shift = len(geom.shifts)
    values = 0.3 * yy - 0.7 * xx
    np.testing.assert_allclose(values @ geom.gradients[:, :n_shift], 0.3)
    np.testing.assert_allclose(values @ geom.gradients[:, n_shift:], -0.7)
