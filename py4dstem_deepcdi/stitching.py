"""Stitching of phase patches into one image (paper Eq. 2).

Each network output is a phase patch (radians) on the real-space window grid, trustworthy only inside the
illuminated ``mask`` and known only up to an unknown constant per patch (the zero frequency of a diffraction
pattern's phase is lost). :func:`solve_offsets` finds the per-patch constants ``c_i`` that minimise

    E = sum_{i, j != i} [ mean(phi_i over S_ij) + c_i - mean(phi_j over S_ji) - c_j ]^2,

``S_ij`` being the part of patch ``i``'s mask that patch ``j``'s mask overlaps (the paper's objective; the sum runs
over ordered pairs, so every overlapping pair counts twice). :func:`stitch` then places the corrected patches on a
canvas with sub-pixel bilinear splatting and averages them where they overlap.

Conventions
-----------
* ``patches``: ``(J, h, w)`` float phase (rad). Values outside ``mask`` are ignored (they may be NaN).
* ``positions_px``: ``(J, 2)`` float canvas-pixel coordinates ``(row, col)`` of each patch's centre pixel: patch
  pixel ``(a, b)`` lands on canvas coordinate ``(pos[0] + a - h // 2, pos[1] + b - w // 2)``.
* Two patches form a pair when the overlap of their masks, computed with their relative position rounded to whole
  pixels, ``d = rint(pos_j - pos_i)``, covers at least ``min_overlap`` of the mask area. Pairs are grouped by ``d``,
  so the overlap means of all patches come from a single matrix product ``patches[:, mask] @ overlap_masks``.
* Tilts (``tilt=True``) are per-patch phase gradients ``t_i`` (rad/pixel, ``(row, col)``) measured from the patch's
  centre pixel ``(h // 2, w // 2)``: the corrected patch is ``phi_i(u) + c_i + t_i . u``.

Solver
------
``E`` is quadratic in the offsets: its normal equations are a graph Laplacian (one row per patch, one entry per
overlapping neighbour: about 170 per patch for a radius-6 mask at a 1 px step). ``method="lsq"`` solves them by
preconditioned conjugate gradients; the preconditioner is Jacobi plus a coarse-grid correction over aggregates of
patches (square cells in which every two patches overlap), so the iteration count hardly grows with the scan size
(16 iterations to a relative residual of 1e-8 for 65,536 patches). The gauge (the mean offset, per connected group
of patches) is fixed afterwards. ``method="relaxation"`` is the paper's few damped sweeps.

Pairs are found by hashing the positions into 1 px cells, or, for a row-major lattice (the usual raster, rotated or
not, any step), directly from the lattice indices. When the relative positions are not whole pixels, the
overlap means get a first-order correction for the rounding (``delta . mean gradient`` over the overlap), which
removes most of the error the rounding would otherwise cause. Bilinear splatting remains an approximation: a
canvas pixel is a weighted mean of samples within 1 px.

Cost for 65,536 patches of 32x32 (float32, 256 MB): one extra copy of the valid pixels only, a (J, n_shifts) table
of overlap means, and per pair entry (~11 M) an int32 neighbour and a float64 mismatch (+ an int32 shift with
tilts); ``bench/stitching.py`` measures 0.75-1.9 s for offsets plus placement on a 2-core CPU shared with a
training job. ``tilt=True`` is much slower (three unknowns per patch, about 30 s for 65,536 patches there).

Array backends
--------------
Every array operation goes through ``xp = get_array_module(device)`` (numpy, or CuPy for ``device="gpu"``) and the
sparse operator through ``scipy.sparse`` / ``cupyx.scipy.sparse`` (on the GPU the conjugate-gradient iterations stay
on the device). On the host, always: the small coarse-grid system of the preconditioner (one unknown per aggregate
of ~25 patches, three with ``tilt=True``) is factorised with SciPy's sparse LU and solved there every iteration
(a transfer of a few kB each way on a GPU), the connected components are found on the aggregate graph with
``scipy.sparse.csgraph``, lattice detection and the per-shift geometry tables (a few hundred entries) use numpy.
The GPU path has not been run on a GPU (no CuPy on the machines this was written on).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import asnumpy, get_array_module

__all__ = ["OffsetSolution", "StitchResult", "solve_offsets", "stitch"]

_METHODS = ("lsq", "relaxation")
_TILT_GAUGES = ("detrend", "zero_mean")


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class OffsetSolution:
    """Per-patch phase offsets (and optionally tilts) that make overlapping patches agree.

    Attributes
    ----------
    offsets:
        ``(J,)`` float64 constant to add to each patch (rad); numpy or CuPy like the input device.
    tilts:
        ``(J, 2)`` float64 phase gradient to add to each patch (rad/pixel, ``(row, col)``, measured from the patch's
        centre pixel), or ``None`` when ``tilt=False``.
    n_pairs:
        Number of overlapping (unordered) patch pairs used.
    energy_before, energy_after:
        The paper's objective ``E`` (rad², sum over ordered pairs of the squared mismatch of the overlap means) with
        zero offsets/tilts and with the solution (also with ``tilt=True``, whose solve adds first-moment terms).
        ``energy_after`` comes from the quadratic form; its absolute accuracy is about 1e-13 of ``energy_before``.
    method:
        ``"lsq"`` or ``"relaxation"``.
    iterations:
        Conjugate-gradient iterations (``"lsq"``) or relaxation sweeps.
    converged:
        ``"lsq"``: whether the relative residual of the normal equations reached ``tol``. Always ``True`` for the
        relaxation, which runs a fixed number of sweeps.
    relative_residual:
        ``|H x - g| / |g|`` of the normal equations at the returned solution (``"lsq"``); NaN for the relaxation.
    n_components:
        Number of connected groups of overlapping patches. With more than one the groups' relative offsets are not
        determined by the data; each group's offsets are set to zero mean (a warning is emitted).
    n_shifts:
        Number of distinct rounded relative shifts that qualify as overlapping (columns of the overlap matrix).
    tilt_gauge:
        How the (unobservable) global phase ramp was fixed when ``tilt=True``; ``None`` otherwise.
    """

    offsets: Any
    tilts: Any | None
    n_pairs: int
    energy_before: float
    energy_after: float
    method: str
    iterations: int
    converged: bool
    relative_residual: float
    n_components: int
    n_shifts: int
    tilt_gauge: str | None = None


@dataclass
class StitchResult:
    """A stitched phase image and how it was made.

    Attributes
    ----------
    image:
        2-D float64 canvas (rad): the weighted average of the corrected patches; ``fill_value`` (NaN by default)
        where no patch contributes (``coverage == 0``).
    coverage:
        2-D float64 canvas: the accumulated weights (mask or probe-intensity weights times the bilinear weights).
    offsets, tilts:
        The per-patch offsets (rad) and tilts (rad/pixel) that were applied (``tilts`` is ``None`` without tilt).
    origin_px:
        ``(2,)`` float64: the canvas coordinate of ``positions_px = (0, 0)``; a position ``p`` sits at canvas
        coordinate ``p + origin_px``.
    solution:
        The :class:`OffsetSolution` when the offsets were solved here, ``None`` when they were given.
    n_outside:
        Number of patches that fell entirely outside a user-given canvas (they were skipped).
    """

    image: Any
    coverage: Any
    offsets: Any
    tilts: Any | None
    origin_px: np.ndarray
    solution: OffsetSolution | None
    n_outside: int = 0


# --------------------------------------------------------------------------------------------------------------
# Backend helpers


def _is_numpy(xp) -> bool:
    return xp is np


def _sparse_module(xp):
    if _is_numpy(xp):
        import scipy.sparse as sps  # noqa: PLC0415

        return sps
    import cupyx.scipy.sparse as sps  # noqa: PLC0415  # pragma: no cover - needs a GPU

    return sps  # pragma: no cover


def _to_float(value) -> float:
    return float(asnumpy(value))


def _repeat(xp, values, counts):
    """``numpy.repeat(values, counts)`` for numpy and CuPy (CuPy's repeat takes no array of counts)."""
    if _is_numpy(xp):
        return np.repeat(values, counts, axis=0)
    ends = xp.cumsum(counts)  # pragma: no cover - needs a GPU
    total = int(ends[-1]) if ends.size else 0  # pragma: no cover
    idx = xp.searchsorted(ends, xp.arange(total, dtype=ends.dtype), side="right")  # pragma: no cover
    return values[idx]  # pragma: no cover


def _row_sums(xp, values, indptr, indices, n_rows):
    """Sum ``values`` (one per stored entry of a CSR layout) over each row."""
    if _is_numpy(xp):
        out = np.zeros(n_rows, dtype=np.float64)
        nonempty = indptr[1:] > indptr[:-1]
        if values.size:
            starts = indptr[:-1][nonempty]
            out[nonempty] = np.add.reduceat(values, starts)
        return out
    sps = _sparse_module(xp)  # pragma: no cover - needs a GPU
    mat = sps.csr_matrix((values, indices, indptr), shape=(n_rows, n_rows))  # pragma: no cover
    return mat @ xp.ones(n_rows, dtype=values.dtype)  # pragma: no cover


# --------------------------------------------------------------------------------------------------------------
# Input checks


def _check_inputs(xp, patches, positions_px, mask, *, need_pairs: bool):
    patches = xp.asarray(patches)
    if patches.ndim != 3:
        raise ValueError(f"patches must be a 3-D array (J, h, w) of phase patches, got shape {tuple(patches.shape)}")
    if not (np.issubdtype(patches.dtype, np.floating) or np.issubdtype(patches.dtype, np.integer)):
        raise ValueError(f"patches must be real numbers (phase in rad), got dtype {patches.dtype}")
    if not np.issubdtype(patches.dtype, np.floating):
        patches = patches.astype(xp.float64)
    n_patches, h, w = (int(s) for s in patches.shape)
    positions = xp.asarray(positions_px, dtype=xp.float64)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(
            f"positions_px must have shape (J, 2) (row, col in canvas pixels), got {tuple(positions.shape)}"
        )
    if positions.shape[0] != n_patches:
        raise ValueError(
            f"positions_px has {positions.shape[0]} rows but there are {n_patches} patches; they must match"
        )
    mask = xp.asarray(mask)
    if mask.shape != (h, w):
        raise ValueError(f"mask must have the patch shape {(h, w)}, got {tuple(mask.shape)}")
    mask = mask.astype(bool)
    if n_patches == 0:
        raise ValueError("no patches were given")
    if need_pairs and n_patches < 2:
        raise ValueError("stitching needs at least two overlapping patches to solve offsets; got a single patch")
    if not bool(mask.any()):
        raise ValueError("mask is empty: no pixel of the patches is valid")
    if not bool(xp.isfinite(positions).all()):
        raise ValueError("positions_px contains NaN or infinite values")
    return patches, positions, mask


def _masked_values(xp, patches, pix):
    """``patches[:, pix]`` as a (J, P) array (one copy of the valid pixels only), checked for NaN/inf."""
    n_patches = patches.shape[0]
    flat = patches.reshape(n_patches, -1)
    values = xp.take(flat, pix, axis=1)
    if not bool(xp.isfinite(values).all()):
        raise ValueError("patches contain NaN or infinite values inside the mask")
    return values


# --------------------------------------------------------------------------------------------------------------
# Overlap geometry (depends on the mask only)


@dataclass
class _Geometry:
    h: int
    w: int
    pix: Any  # (P,) flat indices of mask pixels, xp int64
    coords: np.ndarray  # (P, 2) int pixel coordinates of mask pixels (host)
    u: Any  # (P, 2) float64 coordinates relative to the centre pixel (xp)
    shifts: np.ndarray  # (nD, 2) int rounded relative shifts d that qualify (host)
    neg: np.ndarray  # (nD,) index of -d (host)
    counts: np.ndarray  # (nD,) pixels in the overlap S(d) (host)
    lut: np.ndarray  # (2h-1, 2w-1) shift -> column index or -1 (host)
    overlap: Any  # (P, nD) float overlap masks normalised to mean (xp)
    mu: np.ndarray  # (nD, 2) first moments of S(d) relative to the centre pixel (host)
    cov: np.ndarray  # (nD, 3) second central moments (s00, s01, s11) of S(d), px^2 (host)
    moments: Any  # (P, 2 * nD) centred first-moment weights [(u0 - mu0) S/|S| for all d, then (u1 - mu1) ...] (xp)
    gradients: Any  # (P, 2 * nD) weights of the mean central-difference gradient over S(d), axis 0 then 1 (xp)
    clique: int  # largest B with every shift in [-B, B]^2 qualifying (0 if none)


def _geometry(xp, mask, min_overlap: float, dtype) -> _Geometry:
    mask_h = asnumpy(mask).astype(bool)
    h, w = mask_h.shape
    area = int(mask_h.sum())
    # overlap counts |mask ∩ (mask + d)| for all shifts, exact integers from an FFT autocorrelation (host, tiny)
    m = mask_h.astype(np.float64)
    spec = np.fft.rfft2(m, s=(2 * h, 2 * w))
    auto = np.rint(np.fft.irfft2(spec * np.conj(spec), s=(2 * h, 2 * w))).astype(np.int64)
    d0 = np.arange(-(h - 1), h)
    d1 = np.arange(-(w - 1), w)
    counts_grid = auto[np.ix_(d0 % (2 * h), d1 % (2 * w))]  # counts_grid[d0 + h - 1, d1 + w - 1]
    need = max(1, int(math.ceil(min_overlap * area - 1e-9)))
    ok = counts_grid >= need
    sel = np.argwhere(ok)
    shifts = np.stack([d0[sel[:, 0]], d1[sel[:, 1]]], axis=1).astype(np.int64)
    lut = np.full((2 * h - 1, 2 * w - 1), -1, dtype=np.int32)
    lut[sel[:, 0], sel[:, 1]] = np.arange(len(shifts), dtype=np.int32)
    neg = lut[h - 1 - shifts[:, 0], w - 1 - shifts[:, 1]].astype(np.int64)
    counts = counts_grid[sel[:, 0], sel[:, 1]]

    coords = np.argwhere(mask_h)  # (P, 2), row-major order == order of pix
    pix = coords[:, 0] * w + coords[:, 1]
    # S(d) in patch i's coordinates: pixels a in the mask with a - d in the mask
    a0 = coords[:, 0][:, None] - shifts[None, :, 0]
    a1 = coords[:, 1][:, None] - shifts[None, :, 1]
    inside = (a0 >= 0) & (a0 < h) & (a1 >= 0) & (a1 < w)
    hit = np.zeros(inside.shape, dtype=bool)
    hit[inside] = mask_h[a0[inside], a1[inside]]
    if not np.array_equal(hit.sum(axis=0), counts):  # pragma: no cover - internal consistency
        raise RuntimeError("internal error: overlap masks disagree with the overlap counts")
    overlap = hit / counts[None, :].astype(np.float64)
    centre = np.array([h // 2, w // 2], dtype=np.float64)
    u = coords.astype(np.float64) - centre
    mu = (overlap.T @ u) if len(shifts) else np.zeros((0, 2))
    du0 = u[:, 0:1] - mu[None, :, 0]  # (P, nD)
    du1 = u[:, 1:2] - mu[None, :, 1]
    cov = np.stack([(overlap * du0 * du0).sum(0), (overlap * du0 * du1).sum(0), (overlap * du1 * du1).sum(0)], axis=1)
    moments = np.concatenate([overlap * du0, overlap * du1], axis=1)
    # mean central-difference gradient over S(d), from the pixels of S(d) whose two neighbours are in the mask
    index = np.full((h + 2, w + 2), -1, dtype=np.int64)  # padded: neighbours outside the window are "not in mask"
    index[coords[:, 0] + 1, coords[:, 1] + 1] = np.arange(len(coords))
    grads = []
    for axis in (0, 1):
        step = np.array([1, 0]) if axis == 0 else np.array([0, 1])
        up = index[coords[:, 0] + 1 + step[0], coords[:, 1] + 1 + step[1]]
        down = index[coords[:, 0] + 1 - step[0], coords[:, 1] + 1 - step[1]]
        usable = hit & ((up >= 0) & (down >= 0))[:, None]  # (P, nD)
        n_use = usable.sum(axis=0)
        wgt = np.where(n_use > 0, 0.5 / np.maximum(n_use, 1), 0.0)[None, :] * usable
        g = np.zeros(hit.shape)
        rows = np.flatnonzero((up >= 0) & (down >= 0))
        np.add.at(g, up[rows], wgt[rows])
        np.add.at(g, down[rows], -wgt[rows])
        grads.append(g)
    gradients = np.concatenate(grads, axis=1)

    clique = 0
    while True:
        b = clique + 1
        if b > h - 1 or b > w - 1:
            break
        if not ok[h - 1 - b : h + b, w - 1 - b : w + b].all():
            break
        clique = b

    return _Geometry(
        h=h,
        w=w,
        pix=xp.asarray(pix),
        coords=coords,
        u=xp.asarray(u),
        shifts=shifts,
        neg=neg,
        counts=counts,
        lut=lut,
        overlap=xp.asarray(overlap.astype(dtype)),
        mu=mu,
        cov=cov,
        moments=xp.asarray(moments.astype(dtype)),
        gradients=xp.asarray(gradients.astype(dtype)),
        clique=clique,
    )


# --------------------------------------------------------------------------------------------------------------
# Pair graph


@dataclass
class _Graph:
    n: int
    indptr: Any  # (J+1,) xp int32/int64
    indices: Any  # (nnz,) xp int32: neighbour j of each entry (rows ascending, CSR layout)
    shift: Any  # (nnz,) xp int32: column (rounded shift) of each entry
    mis: Any  # (nnz,) xp float64: mean(phi_i over S(d)) - mean(phi_j over S(-d)) of each entry
    extra: list  # the same mismatch for further channels (e.g. first moments), float64 (nnz,) each
    row_counts: Any  # (J,) xp int64
    cell_of: Any  # (J,) xp int64: coarse cell of each patch
    coarse_counts: Any  # (n_cells * key_span,) xp: entries from coarse cell a to a + (k - key_zero)
    key_span: int
    key_zero: int
    cell_shape: tuple[int, int]
    cells_are_cliques: bool
    table: Any = None  # (J, n_columns) int32 neighbour in each column (J where none), raster-like scans only
    table_shift: Any = None  # (n_columns,) shift index of each table column
    lattice: Any = None  # (ny, nx, offsets (L, 2)) when the scan is a row-major lattice: pairs = lattice offsets

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])


def _detect_lattice(pos: np.ndarray):
    """``(ny, nx, a, b)`` if the positions are a row-major lattice ``p0 + i a + j b`` (any rotation, sub-pixel)."""
    n = len(pos)
    if n < 4:
        return None
    p0 = pos[0]
    tol = 1e-6 * max(1.0, float(np.abs(pos).max()))
    divisors = [d for d in range(2, n // 2 + 1) if n % d == 0]
    divisors.sort(key=lambda d: abs(d - math.sqrt(n)))
    sample = np.unique(np.linspace(0, n - 1, 64).astype(np.int64))
    for nx in divisors:
        a, b = pos[nx] - p0, pos[1] - p0
        if abs(a[0] * b[1] - a[1] * b[0]) < 1e-9:
            continue
        for idx in (sample, np.arange(n)):
            ii, jj = np.divmod(idx, nx)
            if np.abs(p0 + ii[:, None] * a + jj[:, None] * b - pos[idx]).max() > tol:
                break
        else:
            return n // nx, nx, a, b
    return None


def _find_pairs(xp, positions, geom: _Geometry, channels, *, gradients=None, chunk_entries: int = 1 << 18,
                keep_table: bool = False, keep_shift: bool = True) -> _Graph:
    """All ordered pairs (i, j), i != j, whose rounded relative shift qualifies; CSR layout, rows ascending.

    Patches are hashed into square cells of a grid padded by the search reach (no bounds checks); each patch looks
    at the cells that can hold a qualifying neighbour. A scan that is a row-major lattice (the usual raster, rotated
    or not, any step) is recognised and indexed directly: every lattice offset then has one rounded shift and one
    sub-pixel residual for all patches, so no per-pair rounding is needed. Vectorised over blocks of
    ``chunk_entries`` candidate slots (small blocks stay in cache). Also counts the entries between coarse cells (for the preconditioner and the
    connectivity check), and for every entry the mismatch ``X_i[s] - X_j[-s]`` of each array ``X`` in
    ``channels`` ((J, n_shifts) each; the first is the mean of each patch over every overlap region).

    With ``gradients`` (two (J, n_shifts) arrays: each patch's mean phase gradient over every overlap region), the
    mean mismatch gets a first-order sub-pixel correction: the overlap masks use the rounded shift ``d``, so patch
    j's samples sit ``delta = (p_j - p_i) - d`` away from patch i's; ``mis += delta . (g_i + g_j) / 2``.
    """
    n = int(positions.shape[0])
    h, w = geom.h, geom.w
    q = positions - positions.min(axis=0)
    span = asnumpy(q.max(axis=0))
    reach = np.abs(geom.shifts).max(axis=0)

    # search cells: 1 px unless the scan is so sparse that the grid would be much larger than the patch count
    cs = 1
    while (math.floor(span[0] / cs) + 1) * (math.floor(span[1] / cs) + 1) > 4 * n + 4096:
        cs *= 2
    grid = (int(math.floor(span[0] / cs)) + 1, int(math.floor(span[1] / cs)) + 1)
    cell = xp.floor(q / cs).astype(xp.int64)
    cell[:, 0] = xp.minimum(cell[:, 0], grid[0] - 1)
    cell[:, 1] = xp.minimum(cell[:, 1], grid[1] - 1)

    # equal fractional parts (integer positions, an unrotated raster): the rounded shift IS the cell offset
    frac = q - xp.floor(q)
    equal_frac = cs == 1 and bool((xp.abs(frac - frac[0]) < 1e-9).all())

    # candidate cell offsets e (host, tiny)
    emax = (np.floor((reach + 0.5) / cs) + 1).astype(np.int64)
    e0, e1 = np.meshgrid(np.arange(-emax[0], emax[0] + 1), np.arange(-emax[1], emax[1] + 1), indexing="ij")
    cand = np.stack([e0.ravel(), e1.ravel()], axis=1)
    if equal_frac:
        inb = (np.abs(cand[:, 0]) <= h - 1) & (np.abs(cand[:, 1]) <= w - 1)
        cand = cand[inb]
        col = geom.lut[cand[:, 0] + h - 1, cand[:, 1] + w - 1]
        cand, cand_col = cand[col >= 0], col[col >= 0]
    else:
        dist = np.max(np.abs(geom.shifts[None, :, :] - cs * cand[:, None, :]), axis=2)
        cand = cand[(dist <= cs).any(axis=1)]
        cand_col = None

    # padded cell grid: a margin of emax cells on every side, so cell + e never leaves it
    pg = (grid[0] + 2 * int(emax[0]), grid[1] + 2 * int(emax[1]))
    n_pcells = pg[0] * pg[1]
    itype = xp.int32 if max(n_pcells, n, len(geom.shifts) * n) < 2**31 - 1 else xp.int64
    pcid = ((cell[:, 0] + int(emax[0])) * pg[1] + cell[:, 1] + int(emax[1])).astype(itype)
    counts = xp.bincount(pcid, minlength=n_pcells)
    max_count = int(counts.max())
    dense_slots = max_count <= 8
    if dense_slots:  # table[cell, k] = k-th patch in the cell or -1
        order = xp.argsort(pcid).astype(itype)
        start = (xp.cumsum(counts) - counts).astype(itype)
        tables = []
        for k in range(max_count):
            cells_k = xp.flatnonzero(counts > k)
            table_k = xp.full(n_pcells, -1, dtype=itype)
            table_k[cells_k] = order[start[cells_k] + k]
            tables.append(table_k)
        del order, start
    else:
        order = xp.argsort(pcid).astype(itype)
        start = (xp.cumsum(counts) - counts).astype(itype)
        counts = counts.astype(itype)
    self_col = None
    if max_count == 1:  # a cell holds one patch: e = 0 can only find the patch itself
        if equal_frac and len(cand) == len(geom.shifts) and np.array_equal(cand_col, np.arange(len(cand))):
            self_col = int(np.flatnonzero((cand == 0).all(axis=1))[0])  # keep the column, mask it out below
        else:
            self_free = (cand != 0).any(axis=1)
            cand = cand[self_free]
            cand_col = cand_col[self_free] if cand_col is not None else None
    fixed_cols = equal_frac  # every candidate column has a single shift (and sub-pixel residual)
    cand_frac = None
    lattice = _detect_lattice(asnumpy(positions))
    lattice_info = None
    if lattice is not None:
        ny, nx, va, vb = lattice
        basis = np.stack([va, vb], axis=1)  # r = basis @ (di, dj)
        bound = np.ceil(np.abs(np.linalg.inv(basis)) @ (reach + 1.0)).astype(np.int64)
        bound = np.minimum(bound, [ny - 1, nx - 1])
        l0, l1 = np.meshgrid(np.arange(-bound[0], bound[0] + 1), np.arange(-bound[1], bound[1] + 1), indexing="ij")
        lat = np.stack([l0.ravel(), l1.ravel()], axis=1)
        rel = lat[:, :1] * va[None, :] + lat[:, 1:] * vb[None, :]
        dd = np.rint(rel).astype(np.int64)
        ok = (np.abs(dd[:, 0]) <= h - 1) & (np.abs(dd[:, 1]) <= w - 1) & (lat != 0).any(axis=1)
        lut_at = geom.lut[np.clip(dd[:, 0] + h - 1, 0, 2 * h - 2), np.clip(dd[:, 1] + w - 1, 0, 2 * w - 2)]
        col = np.where(ok, lut_at, -1)
        ok &= col >= 0
        lattice_info = (ny, nx, lat[ok])
    if lattice is not None and not equal_frac:  # index the lattice directly (integer rasters: cells are as fast)
        cand, cand_col, cand_frac = lat[ok], col[ok], rel[ok] - dd[ok]
        pg = (ny + 2 * int(bound[0]), nx + 2 * int(bound[1]))
        n_pcells = pg[0] * pg[1]
        itype = xp.int32 if max(n_pcells, n, len(geom.shifts) * n) < 2**31 - 1 else xp.int64
        kk = xp.arange(n, dtype=xp.int64)
        pcid = ((kk // nx + int(bound[0])) * pg[1] + kk % nx + int(bound[1])).astype(itype)
        table_0 = xp.full(n_pcells, -1, dtype=itype)
        table_0[pcid] = xp.arange(n, dtype=itype)
        tables, max_count, dense_slots, self_col, fixed_cols = [table_0], 1, True, None, True
        if not np.any(cand_frac):
            cand_frac = None
    n_cand = len(cand)
    eoff = xp.asarray((cand[:, 0] * pg[1] + cand[:, 1]).astype(np.int64)).astype(itype)
    cand_frac_x = xp.asarray(cand_frac) if cand_frac is not None else None
    cand_col_x = xp.asarray(cand_col.astype(np.int32)) if cand_col is not None else None
    lut_flat = xp.asarray(geom.lut.ravel())
    p0 = xp.ascontiguousarray(positions[:, 0])
    p1 = xp.ascontiguousarray(positions[:, 1])

    # coarse cells (cliques when possible): blocks of `cb` x `cb` search cells
    cells_are_cliques = geom.clique >= cs
    cb = max(1, geom.clique // cs) if cells_are_cliques else max(1, int(math.ceil(4 / cs)))
    cgrid = ((grid[0] + cb - 1) // cb, (grid[1] + cb - 1) // cb)
    creach = int(emax.max() // cb + 1)
    key_zero = creach * cgrid[1] + creach
    key_span = 2 * key_zero + 1
    cell_of = (cell[:, 0] // cb) * cgrid[1] + cell[:, 1] // cb
    cell_of_i = cell_of.astype(itype)
    n_cells = cgrid[0] * cgrid[1]
    ktype = xp.int32 if n_cells * key_span < 2**31 - 1 else xp.int64

    chunk = max(1, chunk_entries // max(1, n_cand * max_count))
    cand_col_3d = cand_col_x[None, :, None] if cand_col_x is not None else None
    coarse_counts = xp.zeros(n_cells * key_span, dtype=xp.int64)
    means = channels[0]
    n_shift = int(means.shape[1])
    flats = [ch.reshape(-1) for ch in channels]
    grad_flats = [g_.reshape(-1) for g_ in gradients] if gradients is not None else None
    neg_x = xp.asarray(geom.neg.astype(np.int64)).astype(itype)
    neg_cand = neg_x[cand_col_x] if cand_col_x is not None else None
    out_j, out_s, out_cnt = [], [], []
    out_mis = [[] for _ in channels]
    table = None
    if keep_table and fixed_cols and max_count == 1:  # raster-like scans: one neighbour per column, one shift each
        table = xp.empty((n, n_cand), dtype=xp.int32)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        m = i1 - i0
        ii = own_grad = None
        tc = pcid[i0:i1, None] + eoff[None, :]
        if dense_slots:
            if max_count == 1:
                jj3 = tables[0][tc]  # (m, n_cand)
            else:
                jj3 = xp.empty((m, n_cand, max_count), dtype=itype)  # (m, n_cand, slot)
                for k, table_k in enumerate(tables):
                    jj3[:, :, k] = table_k[tc]
            valid = jj3 >= 0
            if self_col is not None:
                valid[:, self_col] = False
            if table is not None:
                table[i0:i1] = xp.where(valid, jj3, n)
            jj = jj3[valid]
            cnt = valid.reshape(m, -1).sum(axis=1)
            ss = own = idx_j = None
            if fixed_cols and max_count == 1:  # the neighbour's column -d is fixed per candidate column
                idx_j = (jj3 * n_shift + neg_cand[None, :])[valid]
                if cand_frac_x is not None:
                    frac_cols = [xp.broadcast_to(cand_frac_x[None, :, a], jj3.shape)[valid] for a in (0, 1)]
            if fixed_cols:
                cc = cand_col_x[None, :] if max_count == 1 else cand_col_3d
                ss = xp.broadcast_to(cc, jj3.shape)[valid]
                if self_col is not None:  # columns == shifts: our own values are the rows of each channel
                    own = [ch[i0:i1][valid] for ch in channels]
                elif max_count == 1:  # no self pairs to drop later: take our own values before compaction
                    own = [ch[i0:i1][:, cand_col_x][valid] for ch in channels]
                    if gradients is not None and cand_frac_x is not None:
                        own_grad = [g_[i0:i1][:, cand_col_x][valid] for g_ in gradients]
            del jj3, valid
        else:
            cnt_t = counts[tc].ravel()
            slot = _repeat(xp, xp.arange(tc.size, dtype=itype), cnt_t)
            offs = xp.cumsum(cnt_t) - cnt_t
            tcf = tc.ravel()
            jj = order[start[tcf[slot]] + (xp.arange(slot.size, dtype=itype) - offs[slot].astype(itype))]
            cnt = cnt_t.reshape(m, n_cand).sum(axis=1)
            ss = cand_col_x[slot % n_cand] if fixed_cols else None
            own = idx_j = None
            del cnt_t, slot, offs, tcf
        frac0 = frac1 = None
        if fixed_cols and max_count == 1 and cand_frac_x is not None:
            frac0, frac1 = frac_cols
        if not fixed_cols or max_count > 1:
            ii = _repeat(xp, xp.arange(i0, i1, dtype=itype), cnt)
            keep = jj != ii
            if not fixed_cols:
                frac0 = p0[jj] - _repeat(xp, p0[i0:i1], cnt)
                frac1 = p1[jj] - _repeat(xp, p1[i0:i1], cnt)
                d0 = xp.rint(frac0)
                d1 = xp.rint(frac1)
                frac0 -= d0
                frac1 -= d1
                keep &= (xp.abs(d0) <= h - 1) & (xp.abs(d1) <= w - 1)
                flat = (xp.clip(d0, -(h - 1), h - 1).astype(itype) + (h - 1)) * (2 * w - 1)
                flat += xp.clip(d1, -(w - 1), w - 1).astype(itype) + (w - 1)
                ss = lut_flat[flat]
                keep &= ss >= 0
                del d0, d1, flat
                frac0, frac1 = frac0[keep], frac1[keep]
            jj, ss, ii = jj[keep], ss[keep], ii[keep]
            cnt = xp.bincount(ii - i0, minlength=m)
            del keep
        idx_i = ii * n_shift + ss if own is None else None
        if idx_j is None:
            idx_j = jj * n_shift + neg_x[ss]
        for c, flat in enumerate(flats):
            mis = (xp.take(flat, idx_i) if own is None else own[c]).astype(xp.float64)
            mis -= xp.take(flat, idx_j)
            if c == 0 and grad_flats is not None and frac0 is not None:
                for a, (frac, gflat) in enumerate(zip((frac0, frac1), grad_flats)):
                    gsum = (xp.take(gflat, idx_i) if own_grad is None else own_grad[a]).astype(xp.float64)
                    gsum += xp.take(gflat, idx_j)
                    mis += 0.5 * frac * gsum
                del gsum
            out_mis[c].append(mis)
        del own, idx_i, idx_j, mis, frac0, frac1
        # coarse-cell pair counts (a local bincount: the keys of one block of rows span a short range)
        key = _repeat(xp, cell_of_i[i0:i1].astype(ktype) * (key_span - 1) + key_zero, cnt)
        key += cell_of_i[jj].astype(ktype)
        if key.size:
            kmin = int(key.min())
            local = xp.bincount(key - kmin)
            coarse_counts[kmin : kmin + local.size] += local
        del key
        out_cnt.append(cnt)
        out_j.append(jj.astype(xp.int32) if n < 2**31 else jj)
        if keep_shift:
            out_s.append(ss.astype(xp.int32))
    indices = xp.concatenate(out_j)
    shift = xp.concatenate(out_s) if keep_shift else None
    mis = [xp.concatenate(parts) for parts in out_mis]
    del out_mis
    row_counts = xp.concatenate(out_cnt).astype(xp.int64)
    del out_j, out_s
    indptr = xp.zeros(n + 1, dtype=xp.int64)
    indptr[1:] = xp.cumsum(row_counts)
    if indices.size < 2**31 - 1:
        indptr = indptr.astype(xp.int32)
    return _Graph(
        n=n,
        indptr=indptr,
        indices=indices,
        shift=shift,
        mis=mis[0],
        extra=mis[1:],
        row_counts=row_counts,
        cell_of=cell_of,
        coarse_counts=coarse_counts,
        key_span=key_span,
        key_zero=key_zero,
        cell_shape=cgrid,
        cells_are_cliques=cells_are_cliques,
        table=table,
        table_shift=cand_col_x if table is not None else None,
        lattice=lattice_info,
    )


# --------------------------------------------------------------------------------------------------------------
# Coarse graph: connected components and the aggregates of the two-level preconditioner (host, small)


@dataclass
class _Coarse:
    labels: Any  # (J,) xp int64: connected component of each patch
    n_components: int
    agg: Any  # (J,) xp int64: aggregate of each patch (0 .. n_agg-1)
    n_agg: int
    laplacian: Any  # scipy sparse (n_agg, n_agg) graph Laplacian of the aggregates (pair counts), host


def _coarse(xp, graph: _Graph, target_size: int) -> _Coarse:
    import scipy.sparse as sps  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    n = graph.n
    gy, gx = graph.cell_shape
    n_cells = gy * gx
    cell_of = graph.cell_of
    cell_count = asnumpy(xp.bincount(cell_of, minlength=n_cells))
    counts = asnumpy(graph.coarse_counts).reshape(n_cells, graph.key_span)
    src, off = np.nonzero(counts)
    weight = counts[src, off].astype(np.float64)
    dst = src + off - graph.key_zero
    nonempty = np.flatnonzero(cell_count)

    # connected components: exact from the cell graph when every cell is a clique of overlapping patches
    if graph.cells_are_cliques:
        adj = sps.coo_matrix((weight, (src, dst)), shape=(n_cells, n_cells)).tocsr()
        _, lab_cells = connected_components(adj, directed=False)
        # empty cells are their own components: renumber over the non-empty ones
        uniq, lab_compact = np.unique(lab_cells[nonempty], return_inverse=True)
        lab_full = np.zeros(n_cells, dtype=np.int64)
        lab_full[nonempty] = lab_compact
        labels = xp.asarray(lab_full)[cell_of]
        n_components = len(uniq)
    else:  # tiny masks: fall back to the full patch graph on the host
        full = sps.csr_matrix(
            (np.ones(graph.nnz, dtype=np.int8), asnumpy(graph.indices), asnumpy(graph.indptr)), shape=(n, n)
        )
        n_components, lab = connected_components(full, directed=False)
        labels = xp.asarray(lab.astype(np.int64))

    # aggregates: blocks of m x m cells with about `target_size` patches each
    per_cell = n / max(1, len(nonempty))
    m = max(1, int(round(math.sqrt(target_size / per_cell))))
    ay, ax = (gy + m - 1) // m, (gx + m - 1) // m
    agg_of_cell = (np.arange(n_cells) // gx // m) * ax + (np.arange(n_cells) % gx) // m
    agg_used = np.unique(agg_of_cell[nonempty])
    compact = np.full(ay * ax, -1, dtype=np.int64)
    compact[agg_used] = np.arange(len(agg_used))
    agg_cell = compact[agg_of_cell]
    n_agg = len(agg_used)
    a_src, a_dst = agg_cell[src], agg_cell[dst]
    w_mat = sps.coo_matrix((weight, (a_src, a_dst)), shape=(n_agg, n_agg)).tocsr()
    w_mat.sum_duplicates()
    lap = sps.diags(np.asarray(w_mat.sum(axis=1)).ravel()) - w_mat
    agg = xp.asarray(agg_cell)[cell_of]
    return _Coarse(labels=labels, n_components=int(n_components), agg=agg, n_agg=n_agg, laplacian=lap.tocsr())


class _CoarseSolver:
    """Sparse LU of a (grounded) coarse matrix on the host; applies its inverse to xp vectors."""

    def __init__(self, xp, matrix, k: int = 1):
        import scipy.sparse as sps  # noqa: PLC0415
        from scipy.sparse.csgraph import connected_components  # noqa: PLC0415
        from scipy.sparse.linalg import splu  # noqa: PLC0415

        self.xp = xp
        mat = sps.csr_matrix(matrix)
        size = mat.shape[0]
        diag = mat.diagonal().copy()
        scale = float(np.abs(diag).mean()) if size else 1.0
        scale = scale if scale > 0 else 1.0
        # ground the k unknowns of one aggregate per connected block: the coarse matrix of a Laplacian is singular
        # (constants and, with tilts, ramps); adding to those diagonal entries only moves the null-space component.
        _, lab = connected_components(abs(mat) > 0, directed=False)
        first = np.unique(lab, return_index=True)[1]
        first = ((first // k) * k)[:, None] + np.arange(k)[None, :]
        first = first[first < size].ravel()
        ground = np.zeros(size)
        ground[first] = np.where(diag[first] > 0, diag[first], scale)
        empty = diag <= 0
        ground[empty] += scale  # an unknown with no coupling at all
        self.lu = splu((mat + sps.diags(ground + 1e-12 * scale)).tocsc())

    def __call__(self, rhs):
        sol = self.lu.solve(asnumpy(rhs).astype(np.float64))
        return self.xp.asarray(sol)


# --------------------------------------------------------------------------------------------------------------
# The least-squares system


def _inverse_3x3(xp, m):
    """Inverses of a stack of 3x3 matrices (adjugate / determinant; much faster than a batched LU for tiny blocks)."""
    a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    g, h, i = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    co = xp.stack(
        [
            xp.stack([e * i - f * h, c * h - b * i, b * f - c * e], axis=1),
            xp.stack([f * g - d * i, a * i - c * g, c * d - a * f], axis=1),
            xp.stack([d * h - e * g, b * g - a * h, a * e - b * d], axis=1),
        ],
        axis=1,
    )
    det = a * co[:, 0, 0] + b * co[:, 1, 0] + c * co[:, 2, 0]
    return co / det[:, None, None]


class _System:
    """Normal equations of Eq. 2 over the pair graph, with ``k`` unknowns per patch (1: offset; 3: offset, tilt).

    Mean terms (the paper's E): for an ordered pair entry e = (i, j, shift s) the residual is
    ``r_e = mis_e + a_s . x_i - b_s . x_j`` with ``a_s = (1, mu_s)``, ``b_s = (1, mu_{-s})`` (``x = (c, t)``;
    ``mu`` the centroid of the overlap region) and ``mis_e = mean(phi_i over S(s)) - mean(phi_j over S(-s))``.

    First-moment terms (``k = 3`` only): the centred first moments of the corrected patches over the overlap must
    agree too, ``dm_e + Sigma_s (t_i - t_j) = 0`` with ``dm_e = <phi_i (u - mu)>_S(s) - <phi_j (u - mu)>_S(-s)`` and
    ``Sigma_s`` the covariance of the overlap region, weighted by ``Sigma_s^-1`` (residuals in rad). Without them
    a smooth tilt field with matching offsets is almost invisible to the means (their mismatch is third order),
    which makes the problem ill-posed and conjugate gradients crawl.

    Every entry has a reverse entry with the opposite residual, so minimising ``sum_e r_e^2`` gives ``H x = g``
    with ``(H x)_i = sum_{e in row i} a_s (a_s . x_i - b_s . x_j) [+ Sigma_s (t_i - t_j)]`` and
    ``g_i = -sum_{e in row i} a_s mis_e [- dm_e]``.
    """

    def __init__(self, xp, graph: _Graph, geom: _Geometry, positions, tilt: bool, coarse: _Coarse):
        self.xp = xp
        self.graph = graph
        self.k = 3 if tilt else 1
        self.n = graph.n
        self.mis = graph.mis
        self.energy0 = _to_float(xp.dot(self.mis, self.mis))
        self.deg = graph.row_counts.astype(xp.float64)
        sps = _sparse_module(xp)
        self.adj = None
        if self.k == 1 and graph.lattice is None:  # a lattice scan uses shifted copies instead
            self.adj = sps.csr_matrix(
                (xp.ones(graph.nnz, dtype=xp.float64), graph.indices, graph.indptr), shape=(self.n, self.n)
            )
        self.coarse = coarse
        self.positions = positions
        if self.k == 1:
            self.rhs = -self._rs(self.mis)
            self.rhs_mean = self.rhs
            self.dinv = 1.0 / xp.maximum(self.deg, 1.0)
        else:
            s = graph.shift
            neg = xp.asarray(geom.neg)
            mu = xp.asarray(geom.mu)
            cov = xp.asarray(geom.cov)
            self.mu0, self.mu1 = mu[:, 0], mu[:, 1]
            self.nu0, self.nu1 = mu[neg, 0], mu[neg, 1]
            self.s00, self.s01, self.s11 = cov[:, 0], cov[:, 1], cov[:, 2]
            rs = self._rs
            m0, m1 = self.mu0[s], self.mu1[s]
            dm0, dm1 = graph.extra
            self.rhs_mean = -xp.stack([rs(self.mis), rs(m0 * self.mis), rs(m1 * self.mis)], axis=1).reshape(-1)
            zero = xp.zeros(self.n)
            self.rhs = self.rhs_mean - xp.stack([zero, rs(dm0), rs(dm1)], axis=1).reshape(-1)
            # E0 of the moment terms: sum_e dm^T Sigma^-1 dm
            a, b, c = self.s00[s], self.s01[s], self.s11[s]
            det = a * c - b * b
            self.energy0_mom = _to_float(((c * dm0 * dm0 - 2 * b * dm0 * dm1 + a * dm1 * dm1) / det).sum())
            del a, b, c, det
            dmat = xp.empty((self.n, 3, 3), dtype=xp.float64)
            dmat[:, 0, 0] = self.deg
            dmat[:, 0, 1] = dmat[:, 1, 0] = rs(m0)
            dmat[:, 0, 2] = dmat[:, 2, 0] = rs(m1)
            dmat[:, 1, 1] = rs(m0 * m0)
            dmat[:, 1, 2] = dmat[:, 2, 1] = rs(m0 * m1)
            dmat[:, 2, 2] = rs(m1 * m1)
            del m0, m1
            self.dmat_mean = dmat.copy()
            self.dmat_mom = xp.zeros((self.n, 2, 2), dtype=xp.float64)
            self.dmat_mom[:, 0, 0] = rs(self.s00[s])
            self.dmat_mom[:, 0, 1] = self.dmat_mom[:, 1, 0] = rs(self.s01[s])
            self.dmat_mom[:, 1, 1] = rs(self.s11[s])
            dmat[:, 1:, 1:] += self.dmat_mom
            self.dmat = dmat
            tr = xp.trace(dmat, axis1=1, axis2=2)
            ridge = 1e-9 * xp.maximum(tr, 1.0)
            self.dinv = _inverse_3x3(xp, dmat + ridge[:, None, None] * xp.eye(3)[None])
        self._build_coarse(geom)

    def _rs(self, values):
        g = self.graph
        return _row_sums(self.xp, values, g.indptr, g.indices, self.n)

    # -- operator ------------------------------------------------------------------------------------------
    def _matvec_parts(self, v):
        """(H_mean v, H_moment v) for k = 3."""
        xp = self.xp
        g = self.graph
        x = v.reshape(self.n, 3)
        if g.table is not None:
            return self._matvec_parts_table(x)
        xj = xp.take(x, g.indices, axis=0)
        s = g.shift
        wv = xj[:, 0] + self.nu0[s] * xj[:, 1] + self.nu1[s] * xj[:, 2]
        rs = self._rs
        off = xp.stack([rs(wv), rs(self.mu0[s] * wv), rs(self.mu1[s] * wv)], axis=1)
        mean = xp.einsum("nij,nj->ni", self.dmat_mean, x) - off
        del wv, off
        t0, t1 = xj[:, 1], xj[:, 2]
        mom = xp.einsum("nij,nj->ni", self.dmat_mom, x[:, 1:])
        mom[:, 0] -= rs(self.s00[s] * t0 + self.s01[s] * t1)
        mom[:, 1] -= rs(self.s01[s] * t0 + self.s11[s] * t1)
        return mean.reshape(-1), mom

    def _matvec_parts_table(self, x, rows_per_block: int = 2048):
        """Same as ``_matvec_parts`` from the (J, n_shifts) neighbour table: a gather and one small matmul per block.

        ``sum_{e in row i} C_s x_j`` with per-shift 3x3 blocks ``C_s`` becomes ``X[table] (m, S*3) @ C (S*3, 3)``.
        """
        xp = self.xp
        table = self.graph.table
        xpad = xp.concatenate([x, xp.zeros((1, 3))], axis=0)
        mean = xp.einsum("nij,nj->ni", self.dmat_mean, x)
        mom = xp.einsum("nij,nj->ni", self.dmat_mom, x[:, 1:])
        coef = self._table_coefficients()
        for i0 in range(0, self.n, rows_per_block):
            blk = xp.take(xpad, table[i0 : i0 + rows_per_block], axis=0)  # (m, S, 3)
            out = blk.reshape(blk.shape[0], -1) @ coef  # (m, 5): mean part (3), moment part (2)
            mean[i0 : i0 + rows_per_block] -= out[:, :3]
            mom[i0 : i0 + rows_per_block] -= out[:, 3:]
        return mean.reshape(-1), mom

    def _table_coefficients(self):
        if getattr(self, "_coef", None) is None:
            xp = self.xp
            n_shift = self.mu0.shape[0]
            one = xp.ones(n_shift)
            zero = xp.zeros(n_shift)
            # C_mean[s] rows: (1, nu0, nu1), mu0 * (...), mu1 * (...); C_mom[s]: Sigma_s on the tilt unknowns
            base = xp.stack([one, self.nu0, self.nu1], axis=1)  # (S, 3) over the neighbour's (c, t0, t1)
            c_mean = xp.stack([base, self.mu0[:, None] * base, self.mu1[:, None] * base], axis=2)  # (S, a, b)
            c_mom = xp.stack(
                [xp.stack([zero, self.s00, self.s01], axis=1), xp.stack([zero, self.s01, self.s11], axis=1)], axis=2
            )  # (S, a, 2)
            coef = xp.concatenate([c_mean, c_mom], axis=2)[self.graph.table_shift]  # (columns, a, 5)
            self._coef = coef.reshape(-1, 5)
        return self._coef

    def _lattice_adjacency(self, v):
        """``A v`` for a lattice scan: a sum of shifted copies of the (ny, nx) image of ``v`` (stays in cache)."""
        ny, nx, offsets = self.graph.lattice
        x = v.reshape(ny, nx)
        out = self.xp.zeros_like(x)
        for di, dj in offsets:
            di, dj = int(di), int(dj)
            out[max(0, -di) : ny - max(0, di), max(0, -dj) : nx - max(0, dj)] += x[
                max(0, di) : ny + min(0, di), max(0, dj) : nx + min(0, dj)
            ]
        return out.reshape(-1)

    def matvec(self, v):
        if self.k == 1:
            if self.graph.lattice is not None:
                return self.deg * v - self._lattice_adjacency(v)
            return self.deg * v - self.adj @ v
        mean, mom = self._matvec_parts(v)
        out = mean.reshape(self.n, 3)
        out[:, 1:] += mom
        return out.reshape(-1)

    def energy(self, v, hv=None) -> float:
        """The paper's ``E(v) = sum_e r_e^2`` (mean terms only), from the quadratic form ``E0 - 4 v.g + 2 v.Hv``.

        Uses the antisymmetry of the reverse entry; exact up to rounding of order ``1e-16 * E0`` per term
        (clamped at 0).
        """
        xp = self.xp
        if hv is None:
            hv = self.matvec(v) if self.k == 1 else self._matvec_parts(v)[0]
        e = self.energy0 - 4.0 * _to_float(xp.dot(v, self.rhs_mean)) + 2.0 * _to_float(xp.dot(v, hv))
        return max(e, 0.0)

    # -- preconditioner -------------------------------------------------------------------------------------
    def _build_coarse(self, geom: _Geometry):
        xp = self.xp
        c = self.coarse
        agg = c.agg
        if self.k == 1:
            self._coarse_solve = _CoarseSolver(xp, c.laplacian)
            return
        import scipy.sparse as sps  # noqa: PLC0415

        # coarse basis per aggregate A: x_i = (y_c + delta_i . y_t, y_t), delta_i = p_i - centre_A;
        # Pc = P^T H P assembled from the entries: (A_i, A_i) += alpha alpha^T, (A_i, A_j) -= alpha beta^T with
        # alpha = (1, delta_i + mu_s), beta = (1, delta_j + mu_-s); moment terms act on the tilt unknowns only
        g = self.graph
        na = c.n_agg
        cnt = xp.bincount(agg, minlength=na).astype(xp.float64)
        centre = xp.stack(
            [xp.bincount(agg, weights=self.positions[:, a], minlength=na) for a in (0, 1)], axis=1
        ) / xp.maximum(cnt, 1.0)[:, None]
        self.delta = self.positions - centre[agg]
        s = g.shift
        ai = _repeat(xp, agg, g.row_counts)
        aj = xp.take(agg, g.indices)
        di = _repeat(xp, self.delta, g.row_counts)
        alpha = [None, di[:, 0] + self.mu0[s], di[:, 1] + self.mu1[s]]
        del di
        dj = xp.take(self.delta, g.indices, axis=0)
        beta = [None, dj[:, 0] + self.nu0[s], dj[:, 1] + self.nu1[s]]
        del dj
        sig = {(1, 1): self.s00[s], (1, 2): self.s01[s], (2, 1): self.s01[s], (2, 2): self.s11[s]}
        # aggregates are numbered along the scan, so neighbours have nearby numbers: key on the difference
        diff = aj - ai
        dmin = int(diff.min()) if diff.size else 0
        span = (int(diff.max()) - dmin + 1) if diff.size else 1
        inv = ai * span + (diff - dmin)
        del diff
        n_pairs = na * span
        keys = np.arange(n_pairs)
        rows_u, cols_u = keys // span, keys // span + keys % span + dmin
        blocks_r, blocks_c, blocks_v = [], [], []

        def product(u, v):
            if u is None and v is None:
                return None
            if u is None:
                return v
            if v is None:
                return u
            return u * v

        for p_ in range(3):
            for q_ in range(3):
                off_w = product(alpha[p_], beta[q_])
                diag_w = product(alpha[p_], alpha[q_])
                if p_ and q_:
                    off_w = off_w + sig[(p_, q_)]
                    diag_w = diag_w + sig[(p_, q_)]
                for key, n_out, wts, rr_, cc_, sign in (
                    (inv, n_pairs, off_w, rows_u, cols_u, -1.0),
                    (ai, na, diag_w, np.arange(na), np.arange(na), 1.0),
                ):
                    if wts is None:
                        val = xp.bincount(key, minlength=n_out).astype(xp.float64)
                    else:
                        val = xp.bincount(key, weights=wts, minlength=n_out)
                    blocks_r.append(rr_ * 3 + p_)
                    blocks_c.append(cc_ * 3 + q_)
                    blocks_v.append(sign * asnumpy(val))
        vals_all = np.concatenate(blocks_v)
        r_all, c_all = np.concatenate(blocks_r), np.concatenate(blocks_c)
        keep = (vals_all != 0) & (c_all >= 0) & (c_all < 3 * na)
        mat = sps.coo_matrix((vals_all[keep], (r_all[keep], c_all[keep])), shape=(3 * na, 3 * na)).tocsr()
        mat.sum_duplicates()
        self._coarse_solve = _CoarseSolver(xp, mat, k=3)

    def precondition(self, r):
        xp = self.xp
        c = self.coarse
        agg = c.agg
        if self.k == 1:
            rc = xp.bincount(agg, weights=r, minlength=c.n_agg)
            return self.dinv * r + self._coarse_solve(rc)[agg]
        rr = r.reshape(self.n, 3)
        z = xp.einsum("nij,nj->ni", self.dinv, rr)
        rc = xp.stack(
            [
                xp.bincount(agg, weights=rr[:, 0], minlength=c.n_agg),
                xp.bincount(agg, weights=self.delta[:, 0] * rr[:, 0] + rr[:, 1], minlength=c.n_agg),
                xp.bincount(agg, weights=self.delta[:, 1] * rr[:, 0] + rr[:, 2], minlength=c.n_agg),
            ],
            axis=1,
        ).reshape(-1)
        y = self._coarse_solve(rc).reshape(c.n_agg, 3)[agg]
        z[:, 0] += y[:, 0] + self.delta[:, 0] * y[:, 1] + self.delta[:, 1] * y[:, 2]
        z[:, 1:] += y[:, 1:]
        return z.reshape(-1)

    def jacobi(self, r):
        if self.k == 1:
            return self.dinv * r
        return self.xp.einsum("nij,nj->ni", self.dinv, r.reshape(self.n, 3)).reshape(-1)


def _pcg(system: _System, tol: float, max_iter: int):
    """Preconditioned conjugate gradients on ``H x = g`` from ``x = 0``."""
    xp = system.xp
    b = system.rhs
    x = xp.zeros_like(b)
    bnorm = _to_float(xp.linalg.norm(b))
    if bnorm == 0.0:
        return x, 0, True, 0.0
    r = b.copy()
    z = system.precondition(r)
    p = z.copy()
    rz = xp.dot(r, z)
    it = 0
    rel = 1.0
    converged = False
    while it < max_iter:
        it += 1
        hp = system.matvec(p)
        alpha = rz / xp.dot(p, hp)
        x += alpha * p
        r -= alpha * hp
        rel = _to_float(xp.linalg.norm(r)) / bnorm
        if rel <= tol:
            converged = True
            break
        z = system.precondition(r)
        rz_new = xp.dot(r, z)
        p *= rz_new / rz
        p += z
        rz = rz_new
    return x, it, converged, rel


# --------------------------------------------------------------------------------------------------------------
# Gauge


def _group_lstsq(xp, labels, n_groups, designs, targets):
    """Per-group least squares ``min sum_k |D_k theta_g - y_k|^2`` (tiny ridge), vectorised with bincount."""
    n_par = designs[0].shape[1]
    nmat = xp.zeros((n_groups, n_par, n_par), dtype=xp.float64)
    rhs = xp.zeros((n_groups, n_par), dtype=xp.float64)
    for dmat, y in zip(designs, targets):
        for a in range(n_par):
            rhs[:, a] += xp.bincount(labels, weights=dmat[:, a] * y, minlength=n_groups)
            for b in range(a, n_par):
                v = xp.bincount(labels, weights=dmat[:, a] * dmat[:, b], minlength=n_groups)
                nmat[:, a, b] += v
                if b != a:
                    nmat[:, b, a] += v
    diag = xp.diagonal(nmat, axis1=1, axis2=2)
    ridge = 1e-12 * xp.maximum(diag.max(axis=1), 1e-300)[:, None] + 1e-300
    nmat += ridge[:, :, None] * xp.eye(n_par)[None]
    return xp.linalg.solve(nmat, rhs[:, :, None])[:, :, 0]


def _fix_gauge(xp, x, k, labels, n_comp, positions, patch_means, ubar, tilt_gauge):
    """Fix the null space of Eq. 2 per connected group of patches.

    Offsets only: a constant (offsets get zero mean). With tilts, a common tilt ``tau`` on every patch together with
    offsets ``tau . p_i`` (a global linear phase ramp) is also invisible in the overlaps (exactly for centrally
    symmetric masks at integer positions, nearly otherwise). ``"zero_mean"`` gives the tilts zero mean;
    ``"detrend"`` removes the linear trend of the corrected patch means (patch mean + offset + tilt . mask
    centroid) across the scan. Then the offsets get zero mean.
    """
    n = positions.shape[0]
    cnt = xp.bincount(labels, minlength=n_comp).astype(xp.float64)
    safe = xp.maximum(cnt, 1.0)

    def group_mean(v):
        return (xp.bincount(labels, weights=v, minlength=n_comp) / safe)[labels]

    c = (x if k == 1 else x.reshape(n, 3)[:, 0]).copy()
    t = None
    if k == 3:
        t = x.reshape(n, 3)[:, 1:].copy()
        ph = positions - xp.stack([group_mean(positions[:, 0]), group_mean(positions[:, 1])], axis=1)
        if tilt_gauge == "zero_mean":
            tau = xp.stack([group_mean(t[:, 0]), group_mean(t[:, 1])], axis=1)
        else:  # "detrend"
            y = c + t @ ubar + patch_means
            dmat = xp.stack([xp.ones(n), ph[:, 0], ph[:, 1]], axis=1)
            tau = _group_lstsq(xp, labels, n_comp, [dmat], [y])[labels, 1:3]
        t -= tau
        c -= (tau * ph).sum(axis=1)
    c -= group_mean(c)
    return c, t


# --------------------------------------------------------------------------------------------------------------
# Solver


def _check_options(method, min_overlap, tilt_gauge, n_iter, step):
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not (0.0 < float(min_overlap) <= 1.0):
        raise ValueError(f"min_overlap must be in (0, 1] (a fraction of the mask area), got {min_overlap}")
    if tilt_gauge not in _TILT_GAUGES:
        raise ValueError(f"tilt_gauge must be one of {_TILT_GAUGES}, got {tilt_gauge!r}")
    if method == "relaxation":
        if int(n_iter) < 0:
            raise ValueError(f"n_iter must be >= 0, got {n_iter}")
        if not (0.0 < float(step) <= 1.0):
            raise ValueError(f"step must be in (0, 1] for a stable relaxation, got {step}")


def _solve(xp, values, positions, mask, *, method, min_overlap, tilt, n_iter, step, tol, max_iter, tilt_gauge,
           coarse_size=48) -> OffsetSolution:
    dtype = xp.float32 if values.dtype == xp.float32 else xp.float64
    geom = _geometry(xp, mask, min_overlap, dtype)
    area = int(len(geom.coords))
    if len(geom.shifts) == 0:  # pragma: no cover - (0, 0) always qualifies for min_overlap <= 1
        raise ValueError("no shift qualifies as an overlap; lower min_overlap")
    vals = values.astype(dtype, copy=False)
    n_shift = len(geom.shifts)
    channels = [vals @ geom.overlap]  # (J, n_shifts): mean of each patch over every S(d)
    if tilt:  # centred first moments of each patch over every S(d), per axis (rad px); contiguous results
        channels += [vals @ geom.moments[:, :n_shift], vals @ geom.moments[:, n_shift:]]
    # sub-pixel relative positions: first-order correction of the means for the rounding of the shifts
    frac = positions - xp.floor(positions)
    gradients = None
    if not bool((xp.abs(frac - frac[0]) < 1e-9).all()):
        gradients = [vals @ geom.gradients[:, :n_shift], vals @ geom.gradients[:, n_shift:]]
    del vals
    graph = _find_pairs(xp, positions, geom, channels, gradients=gradients, keep_table=tilt, keep_shift=tilt)
    del channels, gradients
    if graph.nnz == 0:
        raise ValueError(
            f"no pair of patches overlaps by at least min_overlap={min_overlap} of the mask area ({area} pixels): "
            "the scan step is too large for the mask, or min_overlap is too high"
        )
    coarse = _coarse(xp, graph, coarse_size)
    system = _System(xp, graph, geom, positions, tilt, coarse)
    k = system.k
    energy_before = system.energy0
    if method == "lsq":
        x, iterations, converged, rel = _pcg(system, tol, max_iter)
        if not converged:
            warnings.warn(
                f"stitching least squares stopped after {iterations} conjugate-gradient iterations at relative "
                f"residual {rel:.2e} (tol={tol:g}); raise max_iter or tol",
                RuntimeWarning,
                stacklevel=3,
            )
    else:
        x = xp.zeros_like(system.rhs)
        for _ in range(int(n_iter)):
            x -= step * system.jacobi(system.matvec(x) - system.rhs)
        iterations, converged, rel = int(n_iter), True, float("nan")
    if coarse.n_components > 1:
        warnings.warn(
            f"the overlapping patches form {coarse.n_components} disconnected groups; their relative phase offsets "
            "cannot be determined and each group is set to zero mean (check the scan, the mask and min_overlap)",
            RuntimeWarning,
            stacklevel=3,
        )
    ubar = xp.mean(geom.u, axis=0)
    patch_means = values.mean(axis=1, dtype=xp.float64) if k == 3 else None
    offsets, tilts = _fix_gauge(
        xp, x, k, coarse.labels, coarse.n_components, positions, patch_means, ubar, tilt_gauge
    )
    xfinal = offsets if k == 1 else xp.concatenate([offsets[:, None], tilts], axis=1).reshape(-1)
    hx = system.matvec(xfinal)
    energy_after = system.energy(xfinal, hx if k == 1 else None)
    if method == "lsq":  # the true residual of the normal equations, after the gauge
        rnorm = _to_float(xp.linalg.norm(system.rhs))
        rel = _to_float(xp.linalg.norm(system.rhs - hx)) / rnorm if rnorm > 0 else 0.0
    return OffsetSolution(
        offsets=offsets,
        tilts=tilts,
        n_pairs=graph.nnz // 2,
        energy_before=energy_before,
        energy_after=energy_after,
        method=method,
        iterations=int(iterations),
        converged=bool(converged),
        relative_residual=float(rel),
        n_components=coarse.n_components,
        n_shifts=len(geom.shifts),
        tilt_gauge=tilt_gauge if tilt else None,
    )


def solve_offsets(
    patches,
    positions_px,
    mask,
    *,
    method: str = "lsq",
    min_overlap: float = 0.25,
    tilt: bool = False,
    n_iter: int = 3,
    step: float = 0.1,
    tol: float = 1e-8,
    max_iter: int = 1000,
    tilt_gauge: str = "detrend",
    device: str = "cpu",
) -> OffsetSolution:
    """Solve the per-patch phase offsets of paper Eq. 2 (optionally with per-patch tilts).

    Parameters
    ----------
    patches:
        ``(J, h, w)`` phase patches (rad), numpy or CuPy. Only pixels inside ``mask`` are read (others may be NaN).
    positions_px:
        ``(J, 2)`` canvas-pixel coordinates (row, col) of each patch's centre pixel ``(h // 2, w // 2)``; sub-pixel
        (the overlap means are then corrected to first order for the rounding of the relative positions). A
        row-major lattice (raster scan, any rotation and step) is detected and indexed directly (faster).
    mask:
        ``(h, w)`` boolean: the valid (illuminated) pixels, the same for all patches.
    method:
        ``"lsq"``: exact least squares of Eq. 2 (normal equations = weighted graph Laplacian, solved by conjugate
        gradients with a two-level preconditioner: Jacobi plus an aggregation coarse grid). ``"relaxation"``: the
        paper's iterative relaxation: ``n_iter`` sweeps, each moving every offset a fraction ``step`` of the way
        towards agreement with its neighbours (``c_i -= step * mean_j r_ij``, all patches at once; with
        ``tilt=True`` the tilts take the same damped block-Jacobi steps).
    min_overlap:
        A pair counts when the overlap of the two masks (relative position rounded to whole pixels) is at least
        this fraction of the mask area.
    tilt:
        Also solve a per-patch phase gradient ``t_i`` (rad/pixel) in the same least squares: the mean terms get
        ``t_i . mu`` (``mu`` the centroid of the overlap region) and the centred first moments of the corrected
        patches over each overlap must agree as well (``<phi (u - mu)>`` of both patches, weighted by the inverse
        covariance of the overlap region). A global linear ramp is then unobservable (adding ``tau . u`` to every
        patch and ``tau . p_i`` to the offsets changes nothing) and is fixed by ``tilt_gauge``: ``"detrend"``
        (default) removes the linear trend of the corrected patch means across the scan, so a systematic per-patch
        tilt bias does not become an image-wide ramp (a genuine linear phase ramp of the object is removed too);
        ``"zero_mean"`` makes the tilts average to zero (trusts the patches' mean gradient). ``energy_*`` report
        the paper's E (mean terms) also in this mode.
    n_iter, step:
        Sweeps and step of ``method="relaxation"`` (paper: 3 and 0.1).
    tol, max_iter:
        Relative residual of the normal equations at which conjugate gradients stop, and the iteration cap.
    device:
        ``"cpu"`` (numpy) or ``"gpu"`` (CuPy).

    Returns
    -------
    OffsetSolution
        Offsets with zero mean per connected group of overlapping patches (the gauge), tilts or ``None``, the
        number of pairs, and ``E`` (rad², over ordered pairs) before and after.

    Raises
    ------
    ValueError
        Bad shapes, NaN/inf inside the mask or in the positions, a single patch, or no overlapping pair.
    """
    xp = get_array_module(device)
    _check_options(method, min_overlap, tilt_gauge, n_iter, step)
    patches, positions, mask = _check_inputs(xp, patches, positions_px, mask, need_pairs=True)
    geom_pix = xp.asarray(np.flatnonzero(asnumpy(mask).ravel()))
    values = _masked_values(xp, patches, geom_pix)
    return _solve(
        xp,
        values,
        positions,
        mask,
        method=method,
        min_overlap=min_overlap,
        tilt=tilt,
        n_iter=n_iter,
        step=step,
        tol=tol,
        max_iter=max_iter,
        tilt_gauge=tilt_gauge,
    )


# --------------------------------------------------------------------------------------------------------------
# Placement


def _default_origin(positions_h: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.array([h // 2 - math.floor(positions_h[:, 0].min()), w // 2 - math.floor(positions_h[:, 1].min())],
                    dtype=np.float64)


def _place(xp, values, coords, positions, origin, canvas_shape, h, w, offsets, tilts, pixel_weights,
           chunk_entries: int = 1 << 21):
    """Bilinear splatting of the corrected patches; returns (sum of weight*value, sum of weight, n_outside)."""
    height, width = canvas_shape
    pad0, pad1 = h, w
    hp, wp = height + 2 * h + 1, width + 2 * w + 1
    q = positions + xp.asarray(origin)[None, :]
    base = xp.floor(q)
    frac = q - base
    base = base.astype(xp.int64)
    top = base[:, 0] - h // 2  # canvas row of patch pixel row 0 (before the +1 bilinear neighbour)
    left = base[:, 1] - w // 2
    inside = (top <= height - 1) & (top + h >= 0) & (left <= width - 1) & (left + w >= 0)
    n_outside = int(inside.size - int(inside.sum()))
    keep = xp.flatnonzero(inside) if n_outside else None
    if keep is not None:
        values, top, left, frac = values[keep], top[keep], left[keep], frac[keep]
        offsets = offsets[keep]
        tilts = tilts[keep] if tilts is not None else None
    origin_flat = (top + pad0) * wp + (left + pad1)
    pix_off = xp.asarray(coords[:, 0] * wp + coords[:, 1])
    u = xp.asarray(coords.astype(np.float64) - np.array([h // 2, w // 2], dtype=np.float64))
    f0, f1 = frac[:, 0], frac[:, 1]
    corner_w = [(1 - f0) * (1 - f1), (1 - f0) * f1, f0 * (1 - f1), f0 * f1]
    corner_off = [0, 1, wp, wp + 1]
    active = [c for c in range(4) if bool((corner_w[c] != 0).any())]
    n_pix = hp * wp
    acc = xp.zeros(n_pix, dtype=xp.float64)
    n_keep = int(values.shape[0])
    n_sel = int(pix_off.shape[0])
    chunk = max(1, chunk_entries // max(1, n_sel))
    for i0 in range(0, n_keep, chunk):
        i1 = min(n_keep, i0 + chunk)
        v = values[i0:i1].astype(xp.float64) + offsets[i0:i1, None]
        if tilts is not None:
            v += tilts[i0:i1, 0:1] * u[None, :, 0] + tilts[i0:i1, 1:2] * u[None, :, 1]
        v *= pixel_weights[None, :]
        idx = (origin_flat[i0:i1, None] + pix_off[None, :]).ravel()
        for c in active:
            acc += xp.bincount(idx + corner_off[c], weights=(v * corner_w[c][i0:i1, None]).ravel(), minlength=n_pix)
        del v, idx
    # weights: splat the bilinear weights of every patch origin once, then add one shifted copy per pixel
    density = xp.zeros(n_pix, dtype=xp.float64)
    for c in active:
        density += xp.bincount(origin_flat + corner_off[c], weights=corner_w[c], minlength=n_pix)
    cov = xp.zeros(n_pix, dtype=xp.float64)
    pw_h = asnumpy(pixel_weights)
    offs_h = asnumpy(pix_off)
    for p in range(n_sel):
        o = int(offs_h[p])
        cov[o:] += float(pw_h[p]) * density[: n_pix - o]
    acc = acc.reshape(hp, wp)[pad0 : pad0 + height, pad1 : pad1 + width]
    cov = cov.reshape(hp, wp)[pad0 : pad0 + height, pad1 : pad1 + width]
    return acc, cov, n_outside


def stitch(
    patches,
    positions_px,
    mask,
    *,
    offsets=None,
    tilts=None,
    weights=None,
    canvas_shape: tuple[int, int] | None = None,
    origin_px=None,
    method: str = "lsq",
    min_overlap: float = 0.25,
    tilt: bool = False,
    tilt_gauge: str = "detrend",
    n_iter: int = 3,
    step: float = 0.1,
    tol: float = 1e-8,
    max_iter: int = 1000,
    fill_value: float = float("nan"),
    device: str = "cpu",
) -> StitchResult:
    """Stitch phase patches into one image: solve Eq. 2 offsets (unless given), then average on a canvas.

    Parameters
    ----------
    patches, positions_px, mask:
        As for :func:`solve_offsets`: ``(J, h, w)`` phase (rad), ``(J, 2)`` canvas-pixel (row, col) of each patch's
        centre pixel, ``(h, w)`` boolean valid-pixel mask.
    offsets, tilts:
        Per-patch offsets ``(J,)`` (rad) and optional tilts ``(J, 2)`` (rad/pixel) to apply instead of solving.
    weights:
        Optional ``(h, w)`` non-negative per-pixel weight (e.g. the probe intensity); multiplied by ``mask``.
        Default: the mask (a plain average over overlapping patches).
    canvas_shape, origin_px:
        Canvas size (rows, cols) and the canvas coordinate of ``positions_px = (0, 0)``. Default origin: shift the
        positions so that the smallest lands at ``(h // 2, w // 2)`` plus its fractional part; default canvas:
        just large enough for every patch. Patches entirely outside a given canvas are skipped (counted in
        ``n_outside``), partly outside ones are clipped.
    method, min_overlap, tilt, tilt_gauge, n_iter, step, tol, max_iter:
        Passed to :func:`solve_offsets` when ``offsets`` is None.
    fill_value:
        Image value where no patch contributes (``coverage == 0``); NaN by default.
    device:
        ``"cpu"`` (numpy) or ``"gpu"`` (CuPy); the returned arrays live there.

    Returns
    -------
    StitchResult
        ``image`` = sum(weight * corrected phase) / sum(weight) with bilinear weights of the sub-pixel positions,
        ``coverage`` = sum(weight), the offsets/tilts applied, ``origin_px``, and the solver's report.
    """
    xp = get_array_module(device)
    if offsets is None:
        _check_options(method, min_overlap, tilt_gauge, n_iter, step)
        if tilts is not None:
            raise ValueError("tilts are applied only together with given offsets; pass both, or neither to solve")
    patches, positions, mask = _check_inputs(xp, patches, positions_px, mask, need_pairs=offsets is None)
    n, h, w = (int(s) for s in patches.shape)
    pix = xp.asarray(np.flatnonzero(asnumpy(mask).ravel()))
    coords = np.argwhere(asnumpy(mask))

    if weights is None:
        pixel_weights = xp.ones(int(pix.shape[0]), dtype=xp.float64)
    else:
        weights = xp.asarray(weights, dtype=xp.float64)
        if weights.shape != (h, w):
            raise ValueError(f"weights must have the patch shape {(h, w)}, got {tuple(weights.shape)}")
        if not bool(xp.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        pixel_weights = weights.reshape(-1)[pix]
    if not bool((pixel_weights > 0).any()):
        raise ValueError("weights are zero everywhere inside the mask")

    values = _masked_values(xp, patches, pix)
    solution = None
    if offsets is None:
        solution = _solve(
            xp,
            values,
            positions,
            mask,
            method=method,
            min_overlap=min_overlap,
            tilt=tilt,
            n_iter=n_iter,
            step=step,
            tol=tol,
            max_iter=max_iter,
            tilt_gauge=tilt_gauge,
        )
        offsets, tilts = solution.offsets, solution.tilts
    else:
        offsets = xp.asarray(offsets, dtype=xp.float64)
        if offsets.shape != (n,):
            raise ValueError(f"offsets must have shape ({n},), got {tuple(offsets.shape)}")
        if not bool(xp.isfinite(offsets).all()):
            raise ValueError("offsets contain NaN or infinite values")
        if tilts is not None:
            tilts = xp.asarray(tilts, dtype=xp.float64)
            if tilts.shape != (n, 2):
                raise ValueError(f"tilts must have shape ({n}, 2), got {tuple(tilts.shape)}")
            if not bool(xp.isfinite(tilts).all()):
                raise ValueError("tilts contain NaN or infinite values")

    sel = asnumpy(pixel_weights > 0)
    if not sel.all():  # drop zero-weight pixels before the scatter
        sel_x = xp.asarray(np.flatnonzero(sel))
        values = xp.take(values, sel_x, axis=1)
        pixel_weights = pixel_weights[sel_x]
        coords = coords[sel]

    pos_h = asnumpy(positions)
    origin = _default_origin(pos_h, h, w) if origin_px is None else np.asarray(asnumpy(origin_px), dtype=np.float64)
    if origin.shape != (2,) or not np.isfinite(origin).all():
        raise ValueError(f"origin_px must be two finite numbers (row, col), got {origin_px!r}")
    if canvas_shape is None:
        q_max = pos_h.max(axis=0) + origin
        canvas_shape = (
            int(math.ceil(q_max[0] + (h - 1 - h // 2))) + 1,
            int(math.ceil(q_max[1] + (w - 1 - w // 2))) + 1,
        )
    else:
        canvas_shape = tuple(int(s) for s in canvas_shape)
        if len(canvas_shape) != 2 or min(canvas_shape) < 1:
            raise ValueError(f"canvas_shape must be two positive integers, got {canvas_shape!r}")

    acc, cov, n_outside = _place(
        xp, values, coords, positions, origin, canvas_shape, h, w, offsets, tilts, pixel_weights
    )
    if n_outside:
        warnings.warn(f"{n_outside} patches fall entirely outside the canvas and were skipped", RuntimeWarning,
                      stacklevel=2)
    covered = cov > 0
    image = xp.where(covered, acc / xp.where(covered, cov, 1.0), fill_value)
    return StitchResult(
        image=image,
        coverage=cov,
        offsets=offsets,
        tilts=tilts,
        origin_px=origin,
        solution=solution,
        n_outside=n_outside,
    )
