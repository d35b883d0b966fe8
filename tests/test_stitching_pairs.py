"""Pair search: lattice detection, the lattice and cell searches agree, rounded shifts, sub-pixel correction."""

import numpy as np
import pytest
from _stitching_data import H, PlaneWaves, W, circular_mask, cut_patches, integer_scan, rotated_lattice

from py4dstem_deepcdi.stitching import solve_offsets
from py4dstem_deepcdi.stitching.overlap import overlap_geometry
from py4dstem_deepcdi.stitching.pairs import detect_lattice, find_pairs


def _graph(positions, patches, mask, subpixel=True):
    geom = overlap_geometry(np, mask, 0.25, np.float64)
    values = patches[:, mask]
    n_shift = len(geom.shifts)
    gradients = [values @ geom.gradients[:, :n_shift], values @ geom.gradients[:, n_shift:]] if subpixel else None
    return geom, find_pairs(np, positions, geom, values @ geom.overlap, gradients, chunk_entries=4096)


def _entries(graph):
    rows = np.repeat(np.arange(graph.n), graph.row_counts)
    return {(int(i), int(j)): float(m) for i, j, m in zip(rows, graph.indices, graph.mismatch)}


def test_detect_lattice():
    pos = rotated_lattice(n=6, step=1.3, degrees=31.0)
    ny, nx, a, b = detect_lattice(pos)
    assert (ny, nx) == (6, 6)
    np.testing.assert_allclose([np.hypot(*a), np.hypot(*b)], 1.3)
    rect = np.stack(np.meshgrid(np.arange(3.0), np.arange(8.0), indexing="ij"), -1).reshape(-1, 2)
    assert detect_lattice(rect)[:2] == (3, 8)
    assert detect_lattice(rect[::-1].copy())[:2] == (3, 8)  # any start corner
    rng = np.random.default_rng(0)
    assert detect_lattice(rect[rng.permutation(len(rect))]) is None
    assert detect_lattice(rect[:3]) is None  # too few positions
    jittered = rect.copy()
    jittered[5] += 1e-3
    assert detect_lattice(jittered) is None
    assert detect_lattice(np.zeros((9, 2))) is None  # degenerate


@pytest.mark.parametrize("scan", ["rotated", "integer"])
def test_lattice_and_cell_searches_find_the_same_entries(rng, scan):
    obj = PlaneWaves(rng, min_period=16.0)
    mask = circular_mask()
    if scan == "rotated":
        pos = rotated_lattice(n=12)
    else:
        pos = np.stack(np.meshgrid(np.arange(12.0), np.arange(12.0), indexing="ij"), -1).reshape(-1, 2) * 2 + 5
    patches = cut_patches(obj, pos, mask)
    geom, lattice = _graph(pos, patches, mask)
    perm = rng.permutation(len(pos))
    _, cells = _graph(pos[perm], patches[perm], mask)
    assert lattice.lattice is not None and cells.lattice is None
    a = _entries(lattice)
    b = {(int(perm[i]), int(perm[j])): m for (i, j), m in _entries(cells).items()}
    assert a.keys() == b.keys() and len(a) == lattice.nnz
    np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=0, atol=1e-12)
    for i, j in list(a)[:50]:  # antisymmetric, and every rounded shift qualifies
        assert a[(j, i)] == pytest.approx(-a[(i, j)], abs=1e-12)
        d = np.rint(pos[j] - pos[i]).astype(int)
        assert geom.lut[d[0] + H - 1, d[1] + W - 1] >= 0
    np.testing.assert_array_equal(np.diff(lattice.indptr), lattice.row_counts)


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


def test_subpixel_correction_is_exact_for_a_linear_phase():
    """For phi = g . x the overlap means differ by g . (p_j - p_i - d) after rounding; the correction removes it."""
    mask = circular_mask()
    g = np.array([0.3, -0.2])
    pos = integer_scan(np.random.default_rng(1), n=6) + np.random.default_rng(2).uniform(-0.45, 0.45, (36, 2))

    def linear(y, x):
        return g[0] * y + g[1] * x

    patches = cut_patches(linear, pos, mask)
    _, corrected = _graph(pos, patches, mask)
    _, rounded = _graph(pos, patches, mask, subpixel=False)
    assert np.abs(corrected.mismatch).max() < 1e-12
    assert np.abs(rounded.mismatch).max() > 0.1  # |g| * 0.45 px is left without the correction
