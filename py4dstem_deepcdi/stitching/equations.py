"""Normal equations of paper Eq. 2 over the pair graph: a graph Laplacian.

For an ordered pair entry ``(i, j)`` the residual of Eq. 2 is ``r_ij = m_ij + c_i - c_j`` (``m_ij`` the
overlap-mean mismatch of :mod:`.pairs`, ``c`` the offsets, rad). Every entry has a reverse entry with the opposite
residual, so minimising ``E(c) = sum r_ij^2`` gives ``H c = g`` with

    (H c)_i = deg_i c_i - sum_{j ~ i} c_j,        g_i = -sum_{j ~ i} m_ij,

``deg_i`` the number of neighbours of patch ``i``; ``E(c) = E(0) - 4 c.g + 2 c.Hc``. ``H`` is singular: a constant
per connected group of patches is free (the gauge).
"""

from __future__ import annotations

from .arrays import row_sums, sparse_modules, to_float
from .pairs import PairGraph


class NormalEquations:
    """``H`` (as ``matvec``), ``g`` (``rhs``) and ``E`` for the offsets of one pair graph (``xp`` arrays, float64).

    A lattice scan applies ``H`` as a sum of shifted copies of the ``(ny, nx)`` image of ``c`` (one per lattice
    offset, cache-friendly); any other scan through a sparse adjacency matrix.

    Attributes
    ----------
    degree:
        ``(J,)`` neighbours per patch.
    rhs:
        ``g`` (rad).
    energy0:
        ``E(0) = sum m_ij^2`` (rad²).
    """

    def __init__(self, xp, graph: PairGraph):
        self.xp = xp
        self.graph = graph
        self.n = graph.n
        self.degree = graph.row_counts.astype(xp.float64)
        self.energy0 = to_float(xp.dot(graph.mismatch, graph.mismatch))
        self.rhs = -row_sums(xp, graph.mismatch, graph.indptr, self.n)
        self.lattice = graph.lattice
        self.adjacency = None
        if self.lattice is None:
            sps, _ = sparse_modules(xp)
            ones = xp.ones(graph.nnz, dtype=xp.float64)
            self.adjacency = sps.csr_matrix((ones, graph.indices, graph.indptr), shape=(self.n, self.n))

    def matvec(self, c):
        """``H c``."""
        if self.adjacency is None:
            return self.degree * c - self._lattice_adjacency(c)
        return self.degree * c - self.adjacency @ c

    def _lattice_adjacency(self, c):
        """``A c`` for a lattice scan: the sum over the lattice offsets of the shifted ``(ny, nx)`` image of ``c``."""
        ny, nx, offsets = self.lattice
        image = c.reshape(ny, nx)
        out = self.xp.zeros_like(image)
        for di, dj in offsets:
            di, dj = int(di), int(dj)
            out[max(0, -di) : ny - max(0, di), max(0, -dj) : nx - max(0, dj)] += image[
                max(0, di) : ny + min(0, di), max(0, dj) : nx + min(0, dj)
            ]
        return out.reshape(-1)

    def energy(self, c, hc=None) -> float:
        """The paper's ``E(c)`` (rad², over ordered pairs) from the quadratic form, clamped at 0.

        Exact up to rounding of order ``1e-16 E(0)`` per term; pass ``hc = H c`` when it is known.
        """
        xp = self.xp
        if hc is None:
            hc = self.matvec(c)
        return max(self.energy0 - 4.0 * to_float(xp.dot(c, self.rhs)) + 2.0 * to_float(xp.dot(c, hc)), 0.0)

    def residual_norm(self, c, hc=None) -> float:
        """``|H c - g| / |g|`` (0 when ``g = 0``)."""
        xp = self.xp
        if hc is None:
            hc = self.matvec(c)
        norm = to_float(xp.linalg.norm(self.rhs))
        return to_float(xp.linalg.norm(self.rhs - hc)) / norm if norm > 0 else 0.0

