"""Least-squares planes over a 2-D grid: the descan of the disk centres, the background of a phase image.

    plane(i, j) = a + b·i + c·j     (i, j the row and column indices of the grid)
"""

from __future__ import annotations

import numpy as np


def fit_plane(values: np.ndarray) -> np.ndarray:
    """The least-squares plane ``a + b·i + c·j`` through a grid of values, evaluated on the grid.

    Parameters
    ----------
    values
        (R, C) values, or (R, C, K) for K independent channels (e.g. the two components of a centre of mass).

    Returns
    -------
    float64 array of the shape of ``values``.

    Raises
    ------
    ValueError
        For fewer than two dimensions or non-finite values.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (2, 3):
        raise ValueError(f"fit_plane takes an (R, C) or (R, C, K) grid, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("fit_plane needs finite values on the whole grid")
    rows, cols = values.shape[:2]
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    design = np.stack([np.ones(rows * cols), i.ravel(), j.ravel()], -1)
    flat = values.reshape(rows * cols, -1)
    coefficients, *_ = np.linalg.lstsq(design, flat, rcond=None)
    return (design @ coefficients).reshape(values.shape)


def remove_plane(values: np.ndarray) -> np.ndarray:
    """``values`` minus its least-squares plane (:func:`fit_plane`), float64."""
    values = np.asarray(values, dtype=np.float64)
    return values - fit_plane(values)
