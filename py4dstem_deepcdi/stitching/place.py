"""Placement of corrected patches on the canvas: sub-pixel bilinear splatting into sum and weight accumulators.

Patch pixel ``(a, b)`` of a patch at position ``p`` (canvas pixels, ``(row, col)``, the patch's centre pixel
``(h // 2, w // 2)``) lands on canvas coordinate ``q = p + origin + (a - h // 2, b - w // 2)``; its value is spread
over the four canvas pixels around ``q`` with bilinear weights (all on one pixel when ``q`` is whole).
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import asnumpy


def default_origin(positions: np.ndarray, h: int, w: int) -> np.ndarray:
    """Canvas coordinate of position ``(0, 0)`` that puts the smallest position at ``(h // 2, w // 2)`` + fraction.

    The top-left pixel of the patch window at the smallest row and column then lands on canvas row/column 0.
    """
    return np.array([h // 2 - math.floor(positions[:, 0].min()), w // 2 - math.floor(positions[:, 1].min())],
                    dtype=np.float64)


def default_canvas_shape(positions: np.ndarray, origin: np.ndarray, h: int, w: int) -> tuple[int, int]:
    """``(rows, cols)`` just large enough for every patch window (and its bilinear spill) at ``positions + origin``."""
    last = positions.max(axis=0) + origin
    return int(math.ceil(last[0] + (h - 1 - h // 2))) + 1, int(math.ceil(last[1] + (w - 1 - w // 2))) + 1


def accumulate(xp, values, coords: np.ndarray, positions, origin: np.ndarray, canvas_shape: tuple[int, int],
               patch_shape: tuple[int, int], offsets, *, chunk_entries: int = 1 << 21):
    """Splat ``values + offsets`` of every patch on the canvas.

    Parameters
    ----------
    values:
        ``(J, P)`` the patches' mask pixels (rad), in the order of ``coords``.
    coords:
        ``(P, 2)`` int pixel coordinates of the mask pixels in the patch (host).
    positions, origin:
        ``(J, 2)`` canvas-pixel positions (``xp``) and the ``(2,)`` canvas coordinate of position ``(0, 0)`` (host).
    canvas_shape, patch_shape:
        ``(rows, cols)`` of the canvas and ``(h, w)`` of a patch.
    offsets:
        ``(J,)`` float64 constant added to each patch (rad).
    chunk_entries:
        About how many patch pixels one block of patches holds (default 2**21).

    Returns
    -------
    total, weight, n_outside
        ``(rows, cols)`` float64 sums of bilinear weight × value and of bilinear weight (the coverage, in units
        of mask pixels), and the number of patches entirely outside the canvas (skipped; partly outside ones are
        clipped).
    """
    height, width = canvas_shape
    h, w = patch_shape
    wp = width + 2 * w + 1  # padded by one patch (and the bilinear neighbour) on every side: no bounds checks
    n_pix = (height + 2 * h + 1) * wp
    q = positions + xp.asarray(origin)[None, :]
    base = xp.floor(q)
    frac = q - base
    top = base[:, 0].astype(xp.int64) - h // 2  # canvas row of patch row 0
    left = base[:, 1].astype(xp.int64) - w // 2
    inside = (top <= height - 1) & (top + h >= 0) & (left <= width - 1) & (left + w >= 0)
    n_outside = int(inside.size - int(inside.sum()))
    if n_outside:
        keep = xp.flatnonzero(inside)
        values, top, left, frac, offsets = values[keep], top[keep], left[keep], frac[keep], offsets[keep]
    corner = (top + h) * wp + (left + w)  # padded flat index of each patch's pixel (0, 0)
    pixel = xp.asarray(coords[:, 0] * wp + coords[:, 1])
    f0, f1 = frac[:, 0], frac[:, 1]
    corner_weights = [(1 - f0) * (1 - f1), (1 - f0) * f1, f0 * (1 - f1), f0 * f1]
    corner_steps = [0, 1, wp, wp + 1]
    active = [k for k in range(4) if bool((corner_weights[k] != 0).any())]
    total = xp.zeros(n_pix, dtype=xp.float64)
    n_keep = int(values.shape[0])
    chunk = max(1, chunk_entries // max(1, int(pixel.shape[0])))
    for i0 in range(0, n_keep, chunk):
        v = values[i0 : i0 + chunk].astype(xp.float64) + offsets[i0 : i0 + chunk, None]
        idx = (corner[i0 : i0 + chunk, None] + pixel[None, :]).ravel()
        for k in active:
            weights = (v * corner_weights[k][i0 : i0 + chunk, None]).ravel()
            total += xp.bincount(idx + corner_steps[k], weights=weights, minlength=n_pix)
    # weights: splat the bilinear weights of every patch corner once, then add one shifted copy per mask pixel
    density = xp.zeros(n_pix, dtype=xp.float64)
    for k in active:
        density += xp.bincount(corner + corner_steps[k], weights=corner_weights[k], minlength=n_pix)
    weight = xp.zeros(n_pix, dtype=xp.float64)
    for step in asnumpy(pixel).tolist():
        weight[step:] += density[: n_pix - step]
    crop = (slice(h, h + height), slice(w, w + width))
    return total.reshape(-1, wp)[crop], weight.reshape(-1, wp)[crop], n_outside
