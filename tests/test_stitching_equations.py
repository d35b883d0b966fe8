"""Normal equations: H as lattice shifts equals H as a sparse matrix; E from the quadratic form equals the sum."""

import numpy as np
from _stitching_data import PlaneWaves, circular_mask, cut_patches, rotated_lattice

from py4dstem_deepcdi.stitching.equations import NormalEquations
from py4dstem_deepcdi.stitching.overlap import overlap_geometry
from py4dstem_deepcdi.stitching.pairs import find_pairs


def test_operator_energy_and_residual(rng):
    mask = circular_mask()
    pos = rotated_lattice(n=10)
    patches = cut_patches(PlaneWaves(rng), pos, mask) + rng.uniform(-2, 2, len(pos))[:, None, None]
    geom = overlap_geometry(np, mask, 0.25, np.float64)
    graph = find_pairs(np, pos, geom, patches[:, mask] @ geom.overlap)
    assert graph.lattice is not None
    lattice = NormalEquations(np, graph)
    assert lattice.adjacency is None
    graph.lattice = None  # the same graph through the sparse adjacency
    sparse = NormalEquations(np, graph)
    c = rng.standard_normal(graph.n)
    np.testing.assert_allclose(lattice.matvec(c), sparse.matvec(c), atol=1e-12)
    np.testing.assert_allclose(sparse.matvec(np.ones(graph.n)), 0.0, atol=1e-12)  # constants: the null space
    rows = np.repeat(np.arange(graph.n), graph.row_counts)
    residual = graph.mismatch + c[rows] - c[graph.indices]
    np.testing.assert_allclose(sparse.energy(c), np.sum(residual**2), rtol=1e-12)
    np.testing.assert_allclose(sparse.energy0, np.sum(graph.mismatch**2), rtol=1e-14)
    # the gradient of E is 4 (H c - g): zero at the solution
    np.testing.assert_allclose(sparse.matvec(c) - sparse.rhs,
                               np.bincount(rows, weights=residual, minlength=graph.n), atol=1e-10)
    assert sparse.residual_norm(c) > 0.1
