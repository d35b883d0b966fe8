"""Detector defects and outlier patterns: found and repaired before anything else reads the counts.

Counts are read in float64 (no overflow or loss for any float32 or integer input). With ``n_k`` the k-th brightest
(or darkest) of a pixel's 8 neighbours, ``v̄`` a pattern's mean pixel and counts in electrons:

transient hot  ``v > 4·n_1 + 3·v̄`` and ``v − n_1 > 5·sqrt(n_1 + 1) + 10``: a pixel far above all its neighbours in
               one pattern (a cosmic ray, a readout glitch); replaced by its 3×3 median in that pattern
               (py4DSTEM's ``median_filter_masked_pixels_2D``).
static hot     on the scan's mean pattern ``M`` (transients repaired first) ``M > 2·n_3 + τ``, significant in the
               summed counts, or transient in more than half the patterns; ``τ`` is 2% of the bright-field level.
static dead    ``M < n_3/5`` with ``n_3 > τ`` (the 3rd darkest neighbour not hot), significant in the summed counts.
               Static pixels are replaced by their 3×3 median in every pattern (py4DSTEM's
               ``median_filter_masked_pixels``). Using the 3rd neighbour lets pairs and lines of bad pixels be found.
outlier plane  the disk-centre plane is fitted by iteratively reweighted least squares (Tukey's biweight, scale
               from the median absolute deviation), so that a few outlier centres do not tilt it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import py4DSTEM
from py4DSTEM.preprocess import median_filter_masked_pixels, median_filter_masked_pixels_2D
from scipy import ndimage

#: transient hot pixel: value above this many times its brightest neighbour (plus 3 mean pixels)
TRANSIENT_RATIO = 4.0
#: static hot pixel: mean value above this many times its 3rd brightest neighbour (plus 2% of the bright field)
STATIC_RATIO = 2.0
#: static dead pixel: mean value below this fraction of its 3rd darkest neighbour
DEAD_FRACTION = 0.2
#: Tukey biweight constant (in robust standard deviations) of the disk-centre plane fit
BIWEIGHT_C = 4.685

_RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)


def check_counts_dtype(data) -> None:
    """Raise ``TypeError`` unless ``data`` holds real numbers (integer or float): bool, complex and object arrays
    are refused (a mask or a complex wave is no diffraction data)."""
    dtype = np.dtype(getattr(data, "dtype", np.float64))
    if dtype.kind not in "uif":
        kind = {"b": "boolean", "c": "complex"}.get(dtype.kind, f"{dtype}")
        raise TypeError(
            f"the datacube holds {kind} values ({dtype}); diffraction data must be real counts (an integer or float "
            "array): pass the detector counts, not a mask or a complex wave"
        )


def _neighbour_rank(patterns: np.ndarray, rank: int, brightest: bool) -> np.ndarray:
    """The ``rank``-th (1 = extreme) brightest or darkest of each pixel's 8 neighbours, over the last two axes.

    Pixels outside the detector do not count (at the edges fewer neighbours are ranked)."""
    fill = -np.inf if brightest else np.inf
    pad = [(0, 0)] * (patterns.ndim - 2) + [(1, 1), (1, 1)]
    padded = np.pad(patterns, pad, constant_values=fill)
    q0, q1 = patterns.shape[-2:]
    stack = np.stack([padded[..., i : i + q0, j : j + q1] for i, j in zip(*np.nonzero(_RING))], -1)
    ordered = np.sort(stack, -1)
    value = ordered[..., -rank] if brightest else ordered[..., rank - 1]
    return np.where(np.isfinite(value), value, 0.0)


def transient_mask(block: np.ndarray) -> np.ndarray:
    """Pixels (..., Q0, Q1) bool that are hot in their own pattern only (see the module's criterion)."""
    brightest = ndimage.maximum_filter(block, footprint=_RING.reshape((1,) * (block.ndim - 2) + (3, 3)),
                                       mode="constant", cval=0.0)
    mean_pixel = np.broadcast_to(block.mean((-2, -1), keepdims=True), block.shape)
    candidates = np.nonzero(block > TRANSIENT_RATIO * brightest)  # few: the full test runs on these only
    value, neighbour = block[candidates], brightest[candidates]
    hot = (value > TRANSIENT_RATIO * neighbour + 3 * mean_pixel[candidates]) & (
        value - neighbour > 5 * np.sqrt(np.maximum(neighbour, 0) + 1) + 10
    )
    mask = np.zeros(block.shape, dtype=bool)
    mask[tuple(index[hot] for index in candidates)] = True
    return mask


def repair_transients(block: np.ndarray) -> np.ndarray:
    """Repair transient hot pixels of a float block (..., Q0, Q1) in place; returns their mask."""
    mask = transient_mask(block)
    flat, flat_mask = block.reshape(-1, *block.shape[-2:]), mask.reshape(-1, *block.shape[-2:])
    for j in np.flatnonzero(flat_mask.any((-2, -1))):
        median_filter_masked_pixels_2D(flat[j], flat_mask[j])
    return mask


def repair_static(block: np.ndarray, mask: np.ndarray) -> None:
    """Replace the detector pixels ``mask`` (Q0, Q1) by their 3×3 median in every pattern of ``block`` (Rx, Ry, Q0,
    Q1), in place."""
    if mask.any():
        median_filter_masked_pixels(py4DSTEM.DataCube(data=block), mask)


@dataclass
class ScanStatistics:
    """One pass over the counts: ``mean_pattern`` (Q0, Q1) float64 with transients repaired, ``transients``
    (Q0, Q1) how many patterns had each pixel transient-hot, ``patterns`` the number of patterns, ``peak`` the
    largest count."""

    mean_pattern: np.ndarray
    transients: np.ndarray
    patterns: int
    peak: float


def scan_statistics(data, chunk_rows: int = 16, repair: bool = True) -> ScanStatistics:
    """Validate the counts and measure the mean pattern (transient hot pixels repaired first when ``repair``),
    ``chunk_rows`` scan rows at a time, in float64.

    Raises
    ------
    ValueError
        NaN or infinite values; negative counts (beyond rounding of a dark subtraction).
    """
    rx, ry, q0, q1 = data.shape
    total = np.zeros((q0, q1))
    transients = np.zeros((q0, q1), dtype=np.int64)
    peak = 0.0
    for start in range(0, rx, chunk_rows):
        block = np.array(data[start : start + chunk_rows], dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise ValueError("the datacube holds NaN or infinite values; clean or mask them before reconstructing")
        if block.min() < -1e-3 * max(float(block.max()), 1.0):
            raise ValueError(
                f"the datacube holds negative counts (min {block.min():.3g}); subtract the dark reference without "
                "going below zero (or clip) before reconstructing"
            )
        peak = max(peak, float(block.max()))
        np.clip(block, 0, None, out=block)
        if repair:
            transients += repair_transients(block).sum((0, 1))
        total += block.sum((0, 1))
    return ScanStatistics(total / (rx * ry), transients, rx * ry, peak)


@dataclass
class StaticDefects:
    """Detector pixels wrong in every pattern: ``hot`` and ``dead`` (Q0, Q1) bool."""

    hot: np.ndarray
    dead: np.ndarray
    level: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        """Every static defect (Q0, Q1) bool."""
        return self.hot | self.dead


def find_static_defects(stats: ScanStatistics) -> StaticDefects:
    """Hot and dead detector pixels from the scan's mean pattern (criteria in the module docstring)."""
    mean, n = stats.mean_pattern, stats.patterns
    level = float(ndimage.median_filter(mean, size=3, mode="nearest").max())
    tau = 0.02 * level
    high = _neighbour_rank(mean, 3, brightest=True)
    excess = n * (mean - STATIC_RATIO * high)  # summed counts above the allowed
    hot = (mean > STATIC_RATIO * high + tau) & (excess > 5 * np.sqrt(n * STATIC_RATIO * high + 1) + 10)
    hot |= stats.transients > 0.5 * n
    low = _neighbour_rank(np.where(hot, np.inf, mean), 3, brightest=False)  # hot neighbours do not count
    deficit = n * (low - mean)
    dead = (mean < DEAD_FRACTION * low) & (low > tau) & (deficit > 5 * np.sqrt(n * low + 1) + 10) & ~hot
    return StaticDefects(hot, dead, level)


def fit_plane_robust(values: np.ndarray, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A plane ``a + b·i + c·j`` through a grid of vectors (R, C, K) that ignores outliers.

    Iteratively reweighted least squares with Tukey's biweight on the length of each residual vector (scale: 1.4826 ×
    the median residual length); a plain least-squares plane when the residuals vanish.

    Returns
    -------
    (plane (R, C, K) float64, weights (R, C) in [0, 1]: 0 for the rejected outliers)
    """
    values = np.asarray(values, dtype=np.float64)
    rows, cols, k = values.shape
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    design = np.stack([np.ones(rows * cols), i.ravel(), j.ravel()], -1)
    flat = values.reshape(-1, k)
    weights = np.ones(rows * cols)
    for _ in range(iterations):
        root = np.sqrt(weights)[:, None]
        coefficients, *_ = np.linalg.lstsq(design * root, flat * root, rcond=None)
        residual = np.linalg.norm(flat - design @ coefficients, axis=1)
        scale = 1.4826 * np.median(residual)
        if not scale > 0:
            break
        new = np.clip(1 - (residual / (BIWEIGHT_C * scale)) ** 2, 0, None) ** 2
        if np.allclose(new, weights, atol=1e-6) or new.sum() < 3:
            break
        weights = new
    return (design @ coefficients).reshape(values.shape), weights.reshape(rows, cols)
