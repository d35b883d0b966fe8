"""Overlap geometry of the mask: which rounded relative shifts make a pair, and the overlap regions' weights.

Everything here depends on the mask (and ``min_overlap``) only. For a rounded relative shift ``d = rint(p_j -
p_i)`` (pixels, ``(row, col)``) the overlap region ``S(d)`` in patch ``i``'s coordinates is the set of mask pixels
``a`` with ``a - d`` also in the mask; the region of the reverse pair, ``S(-d)``, lies in patch ``j``'s coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import asnumpy


@dataclass(frozen=True)
class OverlapGeometry:
    """The shifts that qualify as overlaps and the per-shift weights over the mask pixels.

    Attributes
    ----------
    h, w:
        Patch shape (pixels).
    area:
        Number of mask pixels ``P``.
    shifts:
        ``(nD, 2)`` int64 rounded relative shifts ``d`` whose overlap holds at least ``min_overlap`` of the mask
        area (host); column ``s`` of the tables below belongs to ``shifts[s]``.
    neg:
        ``(nD,)`` int64 column of ``-d`` for every column (host).
    lut:
        ``(2h - 1, 2w - 1)`` int32 column of shift ``d`` at ``[d0 + h - 1, d1 + w - 1]``, -1 where ``d`` does not
        qualify (host).
    overlap:
        ``(P, nD)`` weights ``1/|S(d)|`` on ``S(d)``, 0 elsewhere (``xp``): ``values @ overlap`` gives every patch's
        mean over every overlap region.
    gradients:
        ``(P, 2 nD)`` weights of the mean central-difference phase gradient over ``S(d)`` (rad/pixel), the ``nD``
        row-axis columns first, then the column-axis ones (``xp``); a pixel counts when both of its neighbours
        along the axis are in the mask.
    clique:
        Largest ``B`` such that every shift in ``[-B, B]^2`` qualifies (0 if none): patches whose positions lie
        within a ``B x B`` pixel cell all overlap each other.
    """

    h: int
    w: int
    area: int
    shifts: np.ndarray
    neg: np.ndarray
    lut: np.ndarray
    overlap: Any
    gradients: Any
    clique: int


def overlap_counts(mask: np.ndarray) -> np.ndarray:
    """``|mask ∩ (mask + d)|`` for every shift ``d``, as a ``(2h - 1, 2w - 1)`` int64 array at ``[d + (h-1, w-1)]``.

    Exact integers from an FFT autocorrelation of the boolean ``(h, w)`` mask.
    """
    h, w = mask.shape
    m = mask.astype(np.float64)
    spectrum = np.fft.rfft2(m, s=(2 * h, 2 * w))
    auto = np.rint(np.fft.irfft2(spectrum * np.conj(spectrum), s=(2 * h, 2 * w))).astype(np.int64)
    d0 = np.arange(-(h - 1), h)
    d1 = np.arange(-(w - 1), w)
    return auto[np.ix_(d0 % (2 * h), d1 % (2 * w))]


def overlap_geometry(xp, mask, min_overlap: float, dtype) -> OverlapGeometry:
    """The :class:`OverlapGeometry` of a boolean ``(h, w)`` mask; the ``xp`` tables get ``dtype``.

    A shift qualifies when its overlap holds at least ``ceil(min_overlap * area)`` pixels (at least one).
    """
    mask_h = asnumpy(mask).astype(bool)
    h, w = mask_h.shape
    area = int(mask_h.sum())
    counts_grid = overlap_counts(mask_h)
    need = max(1, int(math.ceil(min_overlap * area - 1e-9)))
    qualifies = counts_grid >= need
    sel = np.argwhere(qualifies)
    shifts = np.stack([sel[:, 0] - (h - 1), sel[:, 1] - (w - 1)], axis=1).astype(np.int64)
    lut = np.full((2 * h - 1, 2 * w - 1), -1, dtype=np.int32)
    lut[sel[:, 0], sel[:, 1]] = np.arange(len(shifts), dtype=np.int32)
    neg = lut[h - 1 - shifts[:, 0], w - 1 - shifts[:, 1]].astype(np.int64)

    coords = np.argwhere(mask_h)  # (P, 2), row-major: the order of the flat mask indices
    hit = _overlap_regions(mask_h, coords, shifts)
    counts = counts_grid[sel[:, 0], sel[:, 1]]
    if not np.array_equal(hit.sum(axis=0), counts):  # pragma: no cover - internal consistency
        raise RuntimeError("internal error: overlap masks disagree with the overlap counts")
    overlap = hit / counts[None, :].astype(np.float64)
    gradients = _gradient_weights(mask_h, coords, hit)
    return OverlapGeometry(
        h=h, w=w, area=area, shifts=shifts, neg=neg, lut=lut, overlap=xp.asarray(overlap.astype(dtype)),
        gradients=xp.asarray(gradients.astype(dtype)), clique=_clique(qualifies)
    )


def _overlap_regions(mask: np.ndarray, coords: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """``(P, nD)`` boolean: mask pixel ``a`` (``coords``) lies in ``S(d)``, i.e. ``a - d`` is in the mask too."""
    h, w = mask.shape
    a0 = coords[:, 0][:, None] - shifts[None, :, 0]
    a1 = coords[:, 1][:, None] - shifts[None, :, 1]
    inside = (a0 >= 0) & (a0 < h) & (a1 >= 0) & (a1 < w)
    hit = np.zeros(inside.shape, dtype=bool)
    hit[inside] = mask[a0[inside], a1[inside]]
    return hit


def _gradient_weights(mask: np.ndarray, coords: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """``(P, 2 nD)`` weights of the mean central-difference gradient over every ``S(d)``, row axis then column axis.

    Over the pixels of ``S(d)`` whose two neighbours along the axis are in the mask, ``(phi(a + e) - phi(a - e)) / 2``
    is averaged; a region without such pixels gets zero weights.
    """
    h, w = mask.shape
    index = np.full((h + 2, w + 2), -1, dtype=np.int64)  # padded: neighbours outside the window are not in the mask
    index[coords[:, 0] + 1, coords[:, 1] + 1] = np.arange(len(coords))
    columns = []
    for step in ((1, 0), (0, 1)):
        up = index[coords[:, 0] + 1 + step[0], coords[:, 1] + 1 + step[1]]
        down = index[coords[:, 0] + 1 - step[0], coords[:, 1] + 1 - step[1]]
        both = (up >= 0) & (down >= 0)
        usable = hit & both[:, None]  # (P, nD)
        n_use = usable.sum(axis=0)
        weight = np.where(n_use > 0, 0.5 / np.maximum(n_use, 1), 0.0)[None, :] * usable
        g = np.zeros(hit.shape)
        rows = np.flatnonzero(both)
        np.add.at(g, up[rows], weight[rows])
        np.add.at(g, down[rows], -weight[rows])
        columns.append(g)
    return np.concatenate(columns, axis=1)


def _clique(qualifies: np.ndarray) -> int:
    """Largest ``B`` with every shift in ``[-B, B]^2`` qualifying, from the ``(2h - 1, 2w - 1)`` table."""
    rows, cols = qualifies.shape
    h, w = (rows + 1) // 2, (cols + 1) // 2
    clique = 0
    while clique + 1 <= min(h, w) - 1:
        b = clique + 1
        if not qualifies[h - 1 - b : h + b, w - 1 - b : w + b].all():
            break
        clique = b
    return clique
