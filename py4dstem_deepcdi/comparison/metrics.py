"""Scores of phase images on a common grid: background removal, correlation, fitted RMS, contrast scale, FRC."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..frc import fourier_ring_correlation
from ..planes import remove_plane


def remove_background(image: np.ndarray, ramp: bool = False) -> np.ndarray:
    """``image`` (rad) minus its mean (``ramp=False``, default) or minus its least-squares plane ``a + b·i + c·j``
    (``ramp=True``); float64."""
    image = np.asarray(image, dtype=np.float64)
    return remove_plane(image) if ramp else image - image.mean()


def phase_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images of the same shape (offsets removed); NaN if either is constant."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def fitted_rms(image: np.ndarray, truth: np.ndarray) -> float:
    """RMS (units of ``truth``, rad for phases) of ``truth - (a·image + b)`` after the least-squares scale ``a`` and
    offset ``b``: the error that no global contrast or offset explains."""
    x = np.asarray(image, dtype=np.float64).ravel()
    t = np.asarray(truth, dtype=np.float64).ravel()
    design = np.stack([x, np.ones_like(x)], -1)
    coefficients, *_ = np.linalg.lstsq(design, t, rcond=None)
    return float(np.sqrt(np.mean((t - design @ coefficients) ** 2)))


def phase_scale(image: np.ndarray, truth: np.ndarray) -> float:
    """The image's contrast relative to the truth, ``cov(image, truth) / var(truth)``: 1 = right scale, < 1 = too
    weak; NaN for a constant truth."""
    x = np.asarray(image, dtype=np.float64).ravel()
    t = np.asarray(truth, dtype=np.float64).ravel()
    tc = t - t.mean()
    variance = float((tc * tc).sum())
    return float(((x - x.mean()) * tc).sum() / variance) if variance > 0 else float("nan")


def image_frc(a: np.ndarray, b: np.ndarray, sampling: tuple[float, float] | float) -> dict[str, Any]:
    """Fourier ring correlation of two phase images on the same grid (``sampling`` Å/pixel).

    Uses :func:`py4dstem_deepcdi.frc.fourier_ring_correlation` (Tukey-apodised, means removed, no registration).
    Returns ``q`` (Å⁻¹, ring centres), ``frc`` (NaN on the DC ring), ``half_bit`` (threshold curve),
    ``n_per_ring`` and ``resolution_A`` = ``{"0.5": Å, "0.143": Å, "half_bit": Å}``, the first crossing of each
    threshold; NaN when the curve never falls below it up to Nyquist (resolution then ≤ 2 pixels).
    """
    result = fourier_ring_correlation(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), sampling)
    return {
        "q": np.asarray(result.q),
        "frc": np.asarray(result.frc),
        "half_bit": np.asarray(result.half_bit),
        "n_per_ring": np.asarray(result.n_per_ring),
        "resolution_A": {key: float(value) for key, value in result.resolutions.items()},
    }


def score_against_truth(image: np.ndarray, truth: np.ndarray, sampling: tuple[float, float]) -> dict[str, Any]:
    """Scores of a phase image (rad) against the ground truth on the same grid (``sampling`` Å).

    Returns ``correlation`` (:func:`phase_correlation`); ``rms_rad`` (:func:`fitted_rms`); ``phase_scale``
    (:func:`phase_scale`); ``resolution_A`` and ``frc``: the FRC with the truth (:func:`image_frc`).
    """
    frc = image_frc(image, truth, sampling)
    return {
        "correlation": phase_correlation(image, truth),
        "rms_rad": fitted_rms(image, truth),
        "phase_scale": phase_scale(image, truth),
        "resolution_A": frc["resolution_A"],
        "frc": frc,
    }


def format_resolution(value: float, sampling: tuple[float, float]) -> str:
    """An FRC resolution (Å) as text; a NaN one (no threshold crossing up to Nyquist) as ``≤ 2·pixel``."""
    if math.isfinite(value):
        return f"{value:.3g} Å"
    return f"≤ {2 * max(sampling):.3g} Å (Nyquist: no crossing)"
