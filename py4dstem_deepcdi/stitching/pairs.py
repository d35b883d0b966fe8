"""Overlapping pairs of patches and the mismatch of their overlap means.

Two patches ``i`` and ``j`` form a pair when their relative position rounded to whole pixels, ``d = rint(p_j -
p_i)``, is a qualifying shift of the :class:`~.overlap.OverlapGeometry`. For every ordered pair entry the mismatch

    m_ij = mean(phi_i over S(d)) - mean(phi_j over S(-d))            (rad)

comes from the ``(J, nD)`` table of every patch's mean over every overlap region. When the relative positions are
not whole pixels, ``m_ij += delta . (g_i + g_j) / 2`` with ``delta = (p_j - p_i) - d`` and ``g`` the mean phase
gradients over the two overlap regions: a first-order correction for the rounding of the shift.

Two searches find the pairs, block by block of rows (so that a block's entries stay in cache):

* a row-major lattice ``p0 + i a + j b`` (a raster scan of any rotation and step, sub-pixel or not) is detected
  and indexed directly: every lattice offset has one rounded shift and one sub-pixel residual for all patches;
* any other scan is hashed into square cells; each patch looks in the cells that can hold a qualifying neighbour
  and rounds every candidate pair.

Both also count the pair entries between coarse cells (blocks of search cells, cliques of mutually overlapping
patches when the mask allows), from which :mod:`.coarse` builds the connected components and the preconditioner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import asnumpy
from .arrays import repeat
from .overlap import OverlapGeometry

_INT32_MAX = 2**31 - 1
_DENSE_SLOTS = 8  # cells holding at most this many patches are searched through one table per slot


@dataclass(frozen=True)
class CoarseCells:
    """Coarse cells of the scan: square blocks of search cells (``cell_of[i]`` is patch ``i``'s, row-major).

    Pair entries between coarse cells are counted under the key ``a * key_span + (b - a + key_zero)`` for an
    entry from cell ``a`` to cell ``b``. With ``are_cliques`` every two patches of one cell overlap.
    """

    cell_of: Any
    shape: tuple[int, int]
    key_span: int
    key_zero: int
    are_cliques: bool


@dataclass
class PairGraph:
    """All ordered overlapping pairs ``(i, j)``, ``i != j``, in CSR layout (rows ascending).

    Attributes
    ----------
    n:
        Number of patches ``J``.
    indptr, indices:
        CSR row pointers ``(J + 1,)`` and neighbours ``j`` ``(nnz,)`` (``xp`` int32 or int64).
    mismatch:
        ``(nnz,)`` float64 ``m_ij`` of every entry (rad).
    row_counts:
        ``(J,)`` int64 entries per row (the degree of every patch).
    cells, cell_pair_counts:
        The :class:`CoarseCells` and the ``(n_cells * key_span,)`` int64 entry counts between them.
    lattice:
        ``(ny, nx, offsets)`` for a row-major lattice scan, ``offsets`` the ``(L, 2)`` int lattice offsets
        ``(di, dj)`` that are pairs; ``None`` otherwise.
    """

    n: int
    indptr: Any
    indices: Any
    mismatch: Any
    row_counts: Any
    cells: CoarseCells
    cell_pair_counts: Any
    lattice: tuple | None = None

    @property
    def nnz(self) -> int:
        """Number of ordered pair entries (twice the number of pairs)."""
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class _Grid:
    size: int  # cell side (pixels)
    shape: tuple[int, int]
    cell: Any  # (J, 2) xp int64 cell of every patch
    reach: np.ndarray  # (2,) cell offsets (per axis) within which a qualifying neighbour can lie


@dataclass(frozen=True)
class _Block:
    """The pair entries of rows ``i0 .. i1 - 1`` (row-major order)."""

    counts: Any  # (m,) entries per row
    neighbours: Any  # (E,) j of every entry
    index_i: Any  # (E,) flat index i * nD + s into the (J, nD) tables
    index_j: Any  # (E,) flat index j * nD + neg[s]
    residual: tuple | None  # (delta_row, delta_col) of every entry, or None when all are zero


def detect_lattice(positions: np.ndarray):
    """``(ny, nx, a, b)`` if ``positions[k] = p0 + (k // nx) a + (k % nx) b`` for all ``k``, else ``None``.

    ``a`` and ``b`` are any two independent vectors (pixels): a raster scan of any rotation and step, with
    sub-pixel positions or not. Needs at least 4 positions and ``ny, nx >= 2``; positions agree to ``1e-6`` of
    their largest coordinate (at least 1e-6 px).
    """
    n = len(positions)
    if n < 4:
        return None
    p0 = positions[0]
    tol = 1e-6 * max(1.0, float(np.abs(positions).max()))
    divisors = sorted((d for d in range(2, n // 2 + 1) if n % d == 0), key=lambda d: abs(d - math.sqrt(n)))
    sample = np.unique(np.linspace(0, n - 1, 64).astype(np.int64))
    for nx in divisors:
        a, b = positions[nx] - p0, positions[1] - p0
        if abs(a[0] * b[1] - a[1] * b[0]) < 1e-9:
            continue
        for idx in (sample, np.arange(n)):
            ii, jj = np.divmod(idx, nx)
            if np.abs(p0 + ii[:, None] * a + jj[:, None] * b - positions[idx]).max() > tol:
                break
        else:
            return n // nx, nx, a, b
    return None


def _index_type(xp, *sizes):
    return xp.int32 if max(sizes) < _INT32_MAX else xp.int64


def _search_grid(xp, positions, geom: OverlapGeometry) -> _Grid:
    """Square cells of 1 px, doubled while the grid would hold more than ``4 J + 4096`` cells (sparse scans)."""
    n = int(positions.shape[0])
    q = positions - positions.min(axis=0)
    span = asnumpy(q.max(axis=0))
    size = 1
    while (math.floor(span[0] / size) + 1) * (math.floor(span[1] / size) + 1) > 4 * n + 4096:
        size *= 2
    shape = (int(math.floor(span[0] / size)) + 1, int(math.floor(span[1] / size)) + 1)
    cell = xp.floor(q / size).astype(xp.int64)
    cell[:, 0] = xp.minimum(cell[:, 0], shape[0] - 1)
    cell[:, 1] = xp.minimum(cell[:, 1], shape[1] - 1)
    reach_px = np.abs(geom.shifts).max(axis=0)
    reach = (np.floor((reach_px + 0.5) / size) + 1).astype(np.int64)
    return _Grid(size=size, shape=shape, cell=cell, reach=reach)


def _coarse_cells(grid: _Grid, geom: OverlapGeometry) -> CoarseCells:
    """Blocks of ``cb x cb`` search cells: cliques (``cb = clique // size``) when the mask allows, else ~4 px."""
    are_cliques = geom.clique >= grid.size
    cb = max(1, geom.clique // grid.size) if are_cliques else max(1, math.ceil(4 / grid.size))
    shape = ((grid.shape[0] + cb - 1) // cb, (grid.shape[1] + cb - 1) // cb)
    reach = int(grid.reach.max() // cb + 1)
    key_zero = reach * shape[1] + reach
    cell_of = (grid.cell[:, 0] // cb) * shape[1] + grid.cell[:, 1] // cb
    return CoarseCells(cell_of=cell_of, shape=shape, key_span=2 * key_zero + 1, key_zero=key_zero,
                       are_cliques=are_cliques)


class _LatticeSearch:
    """Pairs of a row-major lattice scan: patch ``k`` and ``k + di * nx + dj`` for every qualifying offset."""

    def __init__(self, xp, lattice, geom: OverlapGeometry):
        ny, nx, va, vb = lattice
        h, w = geom.h, geom.w
        basis = np.stack([va, vb], axis=1)  # relative position = basis @ (di, dj)
        reach = np.abs(geom.shifts).max(axis=0)
        bound = np.ceil(np.abs(np.linalg.inv(basis)) @ (reach + 1.0)).astype(np.int64)
        bound = np.minimum(bound, [ny - 1, nx - 1])
        l0, l1 = np.meshgrid(np.arange(-bound[0], bound[0] + 1), np.arange(-bound[1], bound[1] + 1), indexing="ij")
        offsets = np.stack([l0.ravel(), l1.ravel()], axis=1)
        relative = offsets[:, :1] * va[None, :] + offsets[:, 1:] * vb[None, :]
        rounded = np.rint(relative).astype(np.int64)
        ok = (np.abs(rounded[:, 0]) <= h - 1) & (np.abs(rounded[:, 1]) <= w - 1) & (offsets != 0).any(axis=1)
        column = geom.lut[np.clip(rounded[:, 0] + h - 1, 0, 2 * h - 2), np.clip(rounded[:, 1] + w - 1, 0, 2 * w - 2)]
        ok &= column >= 0
        self.offsets = offsets[ok]
        residual = relative[ok] - rounded[ok]
        self.residual = xp.asarray(residual) if np.any(residual) else None
        n_shift = len(geom.shifts)
        self.xp, self.n_shift, self.shape = xp, n_shift, (ny, nx)
        padded = (ny + 2 * int(bound[0]), nx + 2 * int(bound[1]))
        itype = _index_type(xp, padded[0] * padded[1], ny * nx * n_shift)
        k = xp.arange(ny * nx, dtype=xp.int64)
        self.padded_id = ((k // nx + int(bound[0])) * padded[1] + k % nx + int(bound[1])).astype(itype)
        self.table = xp.full(padded[0] * padded[1], -1, dtype=itype)
        self.table[self.padded_id] = xp.arange(ny * nx, dtype=itype)
        self.step = xp.asarray(self.offsets[:, 0] * padded[1] + self.offsets[:, 1]).astype(itype)
        self.column = xp.asarray(column[ok]).astype(itype)
        self.neg_column = xp.asarray(geom.neg[column[ok]]).astype(itype)
        self.slots_per_row = max(1, len(self.offsets))

    def block(self, i0: int, i1: int) -> _Block:
        xp = self.xp
        neighbours = self.table[self.padded_id[i0:i1, None] + self.step[None, :]]  # (m, L), -1 outside the scan
        valid = neighbours >= 0
        rows = xp.arange(i0, i1, dtype=neighbours.dtype)[:, None] * self.n_shift
        residual = None
        if self.residual is not None:
            residual = tuple(xp.broadcast_to(self.residual[None, :, a], valid.shape)[valid] for a in (0, 1))
        return _Block(
            counts=valid.sum(axis=1),
            neighbours=neighbours[valid],
            index_i=(rows + self.column[None, :])[valid],
            index_j=(neighbours * self.n_shift + self.neg_column[None, :])[valid],
            residual=residual,
        )


class _CellSearch:
    """Pairs of any scan: patches hashed into the search grid's cells, every candidate pair rounded and checked.

    When all positions share one fractional part (whole-pixel relative positions) and the cells are 1 px, a cell
    offset is the rounded shift itself: the candidates are the qualifying shifts and nothing needs rounding.
    """

    def __init__(self, xp, positions, grid: _Grid, geom: OverlapGeometry):
        fraction = positions - xp.floor(positions)
        self.exact = grid.size == 1 and bool((xp.abs(fraction - fraction[0]) < 1e-9).all())
        if self.exact:
            candidates = geom.shifts
        else:
            e0, e1 = np.meshgrid(np.arange(-grid.reach[0], grid.reach[0] + 1),
                                 np.arange(-grid.reach[1], grid.reach[1] + 1), indexing="ij")
            candidates = np.stack([e0.ravel(), e1.ravel()], axis=1)
            # a cell offset e can hold a neighbour at rounded shift d only if |d - size * e| <= size on both axes
            distance = np.max(np.abs(geom.shifts[None, :, :] - grid.size * candidates[:, None, :]), axis=2)
            candidates = candidates[(distance <= grid.size).any(axis=1)]
        padded = (grid.shape[0] + 2 * int(grid.reach[0]), grid.shape[1] + 2 * int(grid.reach[1]))
        n_shift = len(geom.shifts)
        itype = _index_type(xp, padded[0] * padded[1], int(positions.shape[0]) * n_shift)
        self.xp, self.itype, self.geom, self.n_shift = xp, itype, geom, n_shift
        self.rows_pos = xp.ascontiguousarray(positions[:, 0])
        self.cols_pos = xp.ascontiguousarray(positions[:, 1])
        self.padded_id = ((grid.cell[:, 0] + int(grid.reach[0])) * padded[1] + grid.cell[:, 1]
                          + int(grid.reach[1])).astype(itype)
        self._index_cells(padded[0] * padded[1])
        self.n_candidates = len(candidates)
        self.step = xp.asarray(candidates[:, 0] * padded[1] + candidates[:, 1]).astype(itype)
        self.lut = xp.asarray(geom.lut.ravel())
        self.neg = xp.asarray(geom.neg).astype(itype)

    def _index_cells(self, n_cells: int):
        """Patches sorted by cell (``order``, ``start``, ``counts``), and one table per slot for sparse cells."""
        xp, itype = self.xp, self.itype
        self.counts = xp.bincount(self.padded_id, minlength=n_cells).astype(itype)
        self.order = xp.argsort(self.padded_id).astype(itype)
        self.start = (xp.cumsum(self.counts) - self.counts).astype(itype)
        self.max_count = int(self.counts.max())
        self.tables = None
        if self.max_count <= _DENSE_SLOTS:  # tables[k][cell]: the k-th patch of the cell or -1
            self.tables = []
            for k in range(self.max_count):
                cells_k = xp.flatnonzero(self.counts > k)
                table = xp.full(n_cells, -1, dtype=itype)
                table[cells_k] = self.order[self.start[cells_k] + k]
                self.tables.append(table)

    @property
    def slots_per_row(self) -> int:
        return max(1, self.n_candidates * self.max_count)

    def _candidates(self, i0: int, i1: int):
        """``(rows, neighbours, candidate)`` of every patch in the candidate cells of rows ``i0 .. i1 - 1``.

        ``candidate`` (the index of the cell offset of every entry) only when ``exact``, else ``None``.
        """
        xp, itype = self.xp, self.itype
        m, n_cand = i1 - i0, self.n_candidates
        cells = self.padded_id[i0:i1, None] + self.step[None, :]
        if self.tables is not None:
            slots = xp.stack([table[cells] for table in self.tables], axis=2)  # (m, n_cand, max_count)
            valid = slots >= 0
            rows = repeat(xp, xp.arange(i0, i1, dtype=itype), valid.reshape(m, -1).sum(axis=1))
            candidate = None
            if self.exact:
                candidate = xp.broadcast_to(xp.arange(n_cand, dtype=itype)[None, :, None], valid.shape)[valid]
            return rows, slots[valid], candidate
        cells = cells.ravel()
        per_cell = self.counts[cells]
        slot = repeat(xp, xp.arange(cells.size, dtype=itype), per_cell)
        rank = xp.arange(slot.size, dtype=itype) - (xp.cumsum(per_cell) - per_cell)[slot].astype(itype)
        neighbours = self.order[self.start[cells[slot]] + rank]
        rows = repeat(xp, xp.arange(i0, i1, dtype=itype), per_cell.reshape(m, n_cand).sum(axis=1))
        return rows, neighbours, (slot % n_cand if self.exact else None)

    def block(self, i0: int, i1: int) -> _Block:
        xp, geom = self.xp, self.geom
        h, w = geom.h, geom.w
        rows, neighbours, candidate = self._candidates(i0, i1)
        if self.exact:  # the candidate index is the column of the shift; no sub-pixel residual
            keep = neighbours != rows
            rows, neighbours, column, residual = rows[keep], neighbours[keep], candidate[keep], None
        else:
            delta0 = self.rows_pos[neighbours] - self.rows_pos[rows]
            delta1 = self.cols_pos[neighbours] - self.cols_pos[rows]
            d0, d1 = xp.rint(delta0), xp.rint(delta1)
            delta0 -= d0
            delta1 -= d1
            keep = (neighbours != rows) & (xp.abs(d0) <= h - 1) & (xp.abs(d1) <= w - 1)
            flat = (xp.clip(d0, -(h - 1), h - 1).astype(self.itype) + (h - 1)) * (2 * w - 1)
            flat += xp.clip(d1, -(w - 1), w - 1).astype(self.itype) + (w - 1)
            column = self.lut[flat]
            keep &= column >= 0
            rows, neighbours, column = rows[keep], neighbours[keep], column[keep].astype(self.itype)
            residual = (delta0[keep], delta1[keep])
        return _Block(
            counts=xp.bincount(rows - i0, minlength=i1 - i0),
            neighbours=neighbours,
            index_i=rows * self.n_shift + column,
            index_j=neighbours * self.n_shift + self.neg[column],
            residual=residual,
        )


def _mismatch(xp, block: _Block, means, gradients):
    """``m_ij`` of a block's entries from the flattened ``(J, nD)`` tables (float64)."""
    mismatch = xp.take(means, block.index_i).astype(xp.float64)
    mismatch -= xp.take(means, block.index_j)
    if gradients is not None and block.residual is not None:
        for delta, gradient in zip(block.residual, gradients):
            both = xp.take(gradient, block.index_i).astype(xp.float64)
            both += xp.take(gradient, block.index_j)
            both *= delta
            mismatch += 0.5 * both
    return mismatch


def _count_cell_pairs(xp, cells: CoarseCells, totals, i0: int, block: _Block):
    """Add a block's entries to the coarse-cell pair counts (a local bincount: a block's keys span a short range)."""
    n_keys = int(totals.shape[0])
    ktype = xp.int32 if n_keys < _INT32_MAX else xp.int64
    own = cells.cell_of[i0 : i0 + int(block.counts.shape[0])].astype(ktype)
    key = repeat(xp, own * (cells.key_span - 1) + cells.key_zero, block.counts)
    key += cells.cell_of[block.neighbours].astype(ktype)
    if key.size:
        first = int(key.min())
        local = xp.bincount(key - first)
        totals[first : first + local.size] += local


def find_pairs(xp, positions, geom: OverlapGeometry, means, gradients=None, *, chunk_entries: int = 1 << 18
               ) -> PairGraph:
    """All ordered overlapping pairs of the patches at ``positions`` and their overlap-mean mismatches.

    Parameters
    ----------
    positions:
        ``(J, 2)`` float64 canvas-pixel positions (``xp``).
    geom:
        The mask's :class:`~.overlap.OverlapGeometry`.
    means:
        ``(J, nD)`` mean of every patch over every overlap region (rad).
    gradients:
        ``None``, or two ``(J, nD)`` arrays: every patch's mean phase gradient over every overlap region along rows
        and columns (rad/pixel), for the sub-pixel correction of the mismatch.
    chunk_entries:
        About how many candidate entries one block of rows holds (default 2**18).
    """
    n = int(positions.shape[0])
    grid = _search_grid(xp, positions, geom)
    cells = _coarse_cells(grid, geom)
    lattice = detect_lattice(asnumpy(positions))
    search = _LatticeSearch(xp, lattice, geom) if lattice is not None else _CellSearch(xp, positions, grid, geom)
    means = means.reshape(-1)
    gradients = [g.reshape(-1) for g in gradients] if gradients is not None else None
    cell_pair_counts = xp.zeros(cells.shape[0] * cells.shape[1] * cells.key_span, dtype=xp.int64)
    chunk = max(1, chunk_entries // search.slots_per_row)
    counts, neighbours, mismatch = [], [], []
    for i0 in range(0, n, chunk):
        block = search.block(i0, min(n, i0 + chunk))
        mismatch.append(_mismatch(xp, block, means, gradients))
        _count_cell_pairs(xp, cells, cell_pair_counts, i0, block)
        counts.append(block.counts)
        neighbours.append(block.neighbours.astype(xp.int32) if n < _INT32_MAX else block.neighbours)
        del block
    row_counts = xp.concatenate(counts).astype(xp.int64)
    indices = xp.concatenate(neighbours)
    indptr = xp.zeros(n + 1, dtype=xp.int64)
    indptr[1:] = xp.cumsum(row_counts)
    if indices.size < _INT32_MAX:
        indptr = indptr.astype(xp.int32)
    return PairGraph(
        n=n,
        indptr=indptr,
        indices=indices,
        mismatch=xp.concatenate(mismatch),
        row_counts=row_counts,
        cells=cells,
        cell_pair_counts=cell_pair_counts,
        lattice=(lattice[0], lattice[1], search.offsets) if lattice is not None else None,
    )
