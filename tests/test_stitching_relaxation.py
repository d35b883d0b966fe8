"""The paper's relaxation: the update c_i -= step * mean_j (m_ij + c_i - c_j), and its energy decrease."""

import numpy as np
import pytest
from _stitching_data import circular_mask, cut_patches, integer_scan
from _stitching_data import exact_data as make_exact_data

from py4dstem_deepcdi.stitching import solve_offsets, stitch
from py4dstem_deepcdi.stitching.equations import NormalEquations
from py4dstem_deepcdi.stitching.overlap import overlap_geometry
from py4dstem_deepcdi.stitching.pairs import find_pairs
from py4dstem_deepcdi.stitching.relaxation import relax


def test_relaxation_is_the_papers_update(rng):
    """Two sweeps from explicit pair lists: every patch moves by step x the mean residual with its neighbours."""
    mask = circular_mask()
    pos = integer_scan(rng, n=5)
    patches = cut_patches(lambda y, x: np.sin(0.3 * y) * np.cos(0.2 * x), pos, mask)
    patches += rng.uniform(-2, 2, len(pos))[:, None, None]
    geom = overlap_geometry(np, mask, 0.25, np.float64)
    graph = find_pairs(np, pos, geom, patches[:, mask] @ geom.overlap)
    rows = np.repeat(np.arange(graph.n), graph.row_counts)
    step = 0.3
    c = np.zeros(graph.n)
    for _ in range(2):
        residual = graph.mismatch + c[rows] - c[graph.indices]
        mean = np.bincount(rows, weights=residual, minlength=graph.n) / np.maximum(graph.row_counts, 1)
        c = c - step * mean
    np.testing.assert_allclose(relax(NormalEquations(np, graph), 2, step), c, atol=1e-12)
    # through solve_offsets: the same offsets up to the gauge (zero mean)
    sol = solve_offsets(patches, pos, mask, method="relaxation", n_iter=2, step=step)
    np.testing.assert_allclose(sol.offsets, c - c.mean(), atol=1e-12)
    assert sol.converged and np.isnan(sol.relative_residual)


def test_relaxation_reduces_energy_and_lsq_is_optimal(rng):
    obj, mask, pos, patches, offsets = make_exact_data(rng)
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
