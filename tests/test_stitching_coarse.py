"""Coarse graph: components, aggregates, and the two-level preconditioner versus Jacobi alone."""

import numpy as np
import scipy.sparse as sps
from _stitching_data import circular_mask

from py4dstem_deepcdi.stitching.arrays import conjugate_gradients
from py4dstem_deepcdi.stitching.coarse import CoarseSolver, TwoLevelPreconditioner, coarse_graph
from py4dstem_deepcdi.stitching.equations import NormalEquations
from py4dstem_deepcdi.stitching.overlap import overlap_geometry
from py4dstem_deepcdi.stitching.pairs import find_pairs


def _equations(pos, rng, min_overlap=0.25):
    mask = circular_mask()
    geom = overlap_geometry(np, mask, min_overlap, np.float64)
    means = rng.uniform(-3, 3, (len(pos), 1)) + np.zeros((1, len(geom.shifts)))
    graph = find_pairs(np, pos, geom, means)
    return graph, NormalEquations(np, graph)


def test_components_and_aggregates(rng):
    grid = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0), indexing="ij"), -1).reshape(-1, 2)
    pos = np.concatenate([grid, grid + [0.0, 100.0], grid[:1] + [200.0, 0.0]])  # two blocks and a loner
    graph, _ = _equations(pos, rng)
    coarse = coarse_graph(np, graph)
    assert coarse.n_components == 3
    labels = coarse.labels
    assert len(set(labels[:400])) == 1 and len(set(labels[400:800])) == 1 and labels[0] != labels[400] != labels[800]
    sizes = np.bincount(coarse.aggregate)
    assert coarse.n_aggregates == len(sizes) and sizes.min() >= 1 and 20 <= np.median(sizes) <= 100
    lap = coarse.laplacian
    np.testing.assert_allclose(np.asarray(lap.sum(axis=1)).ravel(), 0.0)  # a graph Laplacian
    assert lap.diagonal().sum() <= graph.nnz  # entries between aggregates, never more than all entries


def test_coarse_solver_solves_a_grounded_laplacian():
    path = sps.diags([np.full(4, -1.0), np.full(4, -1.0)], [-1, 1], shape=(5, 5)).tocsr()
    lap = sps.diags(-np.asarray(path.sum(axis=1)).ravel()) + path
    rhs = np.array([1.0, -2.0, 0.5, 0.0, 0.5])  # zero sum: in the range of the Laplacian
    x = CoarseSolver(np, lap)(rhs)
    np.testing.assert_allclose(lap @ x, rhs, atol=1e-12)


def test_two_level_preconditioner_beats_jacobi(rng):
    side = 48
    pos = np.stack(np.meshgrid(np.arange(side * 1.0), np.arange(side * 1.0), indexing="ij"), -1).reshape(-1, 2)
    graph, eq = _equations(pos, rng)
    two_level = TwoLevelPreconditioner(np, eq.degree, coarse_graph(np, graph))
    x2, it2, ok2 = conjugate_gradients(np, eq.matvec, two_level, eq.rhs, tol=1e-8, max_iter=500)
    x1, it1, ok1 = conjugate_gradients(np, eq.matvec, lambda r: r / eq.degree, eq.rhs, tol=1e-8, max_iter=500)
    assert ok1 and ok2 and it2 <= 20 and it1 >= 1.5 * it2
    assert eq.residual_norm(x2) <= 1e-8
    np.testing.assert_allclose(x2 - x2.mean(), x1 - x1.mean(), atol=1e-6)
