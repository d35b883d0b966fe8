"""Checks of the stitching inputs (patches, positions, mask) with messages that say what to fix."""

from __future__ import annotations

import numpy as np


def check_inputs(xp, patches, positions_px, mask, *, need_pairs: bool):
    """Validate and convert the inputs of :func:`~py4dstem_deepcdi.stitching.stitch` and ``solve_offsets``.

    Returns
    -------
    patches, positions, mask
        ``(J, h, w)`` float patches (integers become float64), ``(J, 2)`` float64 positions and an ``(h, w)``
        boolean mask, all ``xp`` arrays.

    Raises
    ------
    ValueError
        Wrong shapes or dtypes, no patch, a single patch when offsets must be solved (``need_pairs``), an empty
        mask, or NaN/inf positions.
    """
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


def masked_values(xp, patches, pix):
    """``patches[:, pix]`` as a ``(J, P)`` array (one copy of the valid pixels only).

    Raises
    ------
    ValueError
        NaN or infinite values inside the mask.
    """
    values = xp.take(patches.reshape(patches.shape[0], -1), pix, axis=1)
    if not bool(xp.isfinite(values).all()):
        raise ValueError("patches contain NaN or infinite values inside the mask")
    return values
