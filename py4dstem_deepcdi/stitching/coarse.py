"""The coarse graph of the scan: connected components, and the two-level preconditioner of the offset solve.

The patches are grouped into the coarse cells of :mod:`.pairs` (cliques of mutually overlapping patches when the
mask allows) and the cells into aggregates of about ``target_size`` patches. The preconditioner is

    M r = r / deg + P L_c^+ P^T r,

Jacobi plus a coarse-grid correction: ``P`` sums a vector over each aggregate (``P^T``) and spreads a value back to
its patches (``P``); ``L_c`` is the graph Laplacian of the aggregates (entries: the numbers of pair entries between
them), grounded at one aggregate per connected block and factorised once by sparse LU on the host. With it the
conjugate-gradient iteration count hardly grows with the scan size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sps
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import splu

from ..backend import asnumpy
from .pairs import PairGraph

DEFAULT_AGGREGATE_SIZE = 48  # patches per aggregate of the coarse grid (about)


@dataclass(frozen=True)
class CoarseGraph:
    """Connected components and aggregates of the patches.

    Attributes
    ----------
    labels:
        ``(J,)`` int64 connected component of every patch (``xp``), ``0 .. n_components - 1``.
    n_components:
        Number of connected groups of overlapping patches.
    aggregate:
        ``(J,)`` int64 aggregate of every patch (``xp``), ``0 .. n_aggregates - 1``.
    n_aggregates:
        Number of (non-empty) aggregates.
    laplacian:
        ``(n_aggregates, n_aggregates)`` SciPy CSR graph Laplacian of the aggregates (host).
    """

    labels: Any
    n_components: int
    aggregate: Any
    n_aggregates: int
    laplacian: Any


def coarse_graph(xp, graph: PairGraph, target_size: int = DEFAULT_AGGREGATE_SIZE) -> CoarseGraph:
    """Components and aggregates of ``graph``'s patches (aggregates: squares of cells, ~``target_size`` patches).

    The components come from the graph of the coarse cells when every cell is a clique (exact, and small), else
    from the full patch graph.
    """
    cells = graph.cells
    gy, gx = cells.shape
    n_cells = gy * gx
    cell_count = asnumpy(xp.bincount(cells.cell_of, minlength=n_cells))
    nonempty = np.flatnonzero(cell_count)
    counts = asnumpy(graph.cell_pair_counts).reshape(n_cells, cells.key_span)
    src, key = np.nonzero(counts)
    weight = counts[src, key].astype(np.float64)
    dst = src + key - cells.key_zero
    labels, n_components = _components(xp, graph, src, dst, weight, nonempty)

    side = max(1, int(round(math.sqrt(target_size / (graph.n / max(1, len(nonempty)))))))  # cells per side
    ay, ax = (gy + side - 1) // side, (gx + side - 1) // side
    aggregate_of_cell = (np.arange(n_cells) // gx // side) * ax + (np.arange(n_cells) % gx) // side
    used = np.unique(aggregate_of_cell[nonempty])
    compact = np.full(ay * ax, -1, dtype=np.int64)
    compact[used] = np.arange(len(used))
    aggregate_of_cell = compact[aggregate_of_cell]
    n_aggregates = len(used)
    between = sps.coo_matrix((weight, (aggregate_of_cell[src], aggregate_of_cell[dst])),
                             shape=(n_aggregates, n_aggregates)).tocsr()
    between.sum_duplicates()
    laplacian = sps.diags(np.asarray(between.sum(axis=1)).ravel()) - between
    return CoarseGraph(
        labels=labels,
        n_components=int(n_components),
        aggregate=xp.asarray(aggregate_of_cell)[cells.cell_of],
        n_aggregates=n_aggregates,
        laplacian=laplacian.tocsr(),
    )


def _components(xp, graph: PairGraph, src, dst, weight, nonempty):
    """``(labels, n_components)`` of the patches, from the cell graph (cliques) or the full patch graph."""
    cells = graph.cells
    n_cells = cells.shape[0] * cells.shape[1]
    if cells.are_cliques:
        adjacency = sps.coo_matrix((weight, (src, dst)), shape=(n_cells, n_cells)).tocsr()
        _, cell_labels = connected_components(adjacency, directed=False)
        # empty cells are components of their own: number the components over the non-empty cells
        unique, compact = np.unique(cell_labels[nonempty], return_inverse=True)
        labels = np.zeros(n_cells, dtype=np.int64)
        labels[nonempty] = compact
        return xp.asarray(labels)[cells.cell_of], len(unique)
    n = graph.n
    full = sps.csr_matrix((np.ones(graph.nnz, dtype=np.int8), asnumpy(graph.indices), asnumpy(graph.indptr)),
                          shape=(n, n))
    n_components, labels = connected_components(full, directed=False)
    return xp.asarray(labels.astype(np.int64)), n_components


class CoarseSolver:
    """Sparse LU of a graph Laplacian grounded at one node per connected block; ``solver(rhs)`` on ``xp`` vectors.

    Grounding (adding the diagonal entry once more at one node of every block, and a unit scale at isolated nodes)
    only moves the null-space component of the solution, which the preconditioned iteration does not see.
    """

    def __init__(self, xp, laplacian):
        self.xp = xp
        mat = sps.csr_matrix(laplacian)
        size = mat.shape[0]
        diag = mat.diagonal().copy()
        scale = float(np.abs(diag).mean()) if size else 1.0
        scale = scale if scale > 0 else 1.0
        _, block = connected_components(abs(mat) > 0, directed=False)
        first = np.unique(block, return_index=True)[1]
        ground = np.zeros(size)
        ground[first] = np.where(diag[first] > 0, diag[first], scale)
        ground[diag <= 0] += scale  # a node with no coupling at all
        self.lu = splu((mat + sps.diags(ground + 1e-12 * scale)).tocsc())

    def __call__(self, rhs):
        return self.xp.asarray(self.lu.solve(asnumpy(rhs).astype(np.float64)))


class TwoLevelPreconditioner:
    """``M r = r / deg + P L_c^+ P^T r`` (see the module docstring) for ``xp`` vectors of the patches' offsets."""

    def __init__(self, xp, degree, coarse: CoarseGraph):
        self.xp = xp
        self.inverse_degree = 1.0 / xp.maximum(degree, 1.0)
        self.aggregate = coarse.aggregate
        self.n_aggregates = coarse.n_aggregates
        self.solve_coarse = CoarseSolver(xp, coarse.laplacian)

    def __call__(self, r):
        restricted = self.xp.bincount(self.aggregate, weights=r, minlength=self.n_aggregates)
        return self.inverse_degree * r + self.solve_coarse(restricted)[self.aggregate]
