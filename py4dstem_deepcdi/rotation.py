"""Scan rotation from the centre-of-mass (DPC) deflection field: the rotation that makes it curl-free.

Deflections F (the disk centres minus the descan plane) are ∝ the probe-weighted gradient of the phase (Ehrenfest):
in the scan's frame a curl-free field. Rotating F by θ, ``F_θ = cos θ·F + sin θ·JF`` (J a 90° turn), its curl
energy over the scan's spatial frequencies ``0 < |k| ≤ band`` (the probe passes nothing beyond 2α/λ),

    E(θ) = Σ_k |k̂ × F_θ(k)|² = (cos θ, sin θ) · M · (cos θ, sin θ)ᵀ,

is a quadratic form: the rotation is M's smallest eigenvector, in closed form (py4DSTEM's DPC scans 1° steps of the
mean |curl| of finite differences, which noise flattens). With M's eigenvalues λ₁ ≤ λ₂ (noise ≈ 2λ₁, signal ≈
λ₂ − λ₁) the standard error is ``sqrt(2λ₁ / ((λ₂ − λ₁)·Rx·Ry))`` rad. The transpose is the one with less curl.
A rotation of 180° is not distinguished from 0°. :func:`plot_rotation_fit` draws E(θ) for both transposes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

#: a rotation estimate is used silently if its standard error (deg) is at most this
ROTATION_PRECISE_DEG = 1.0
#: ... with a warning up to this; beyond it (or for an ambiguous transpose) 0° and no transpose are used instead
ROTATION_USABLE_DEG = 3.0
#: the transpose is clear when the better one leaves at most this fraction of the other's curl energy
ROTATION_TRANSPOSE_RATIO = 0.6


@dataclass
class RotationFit:
    """The scan rotation that makes the centre-of-mass deflection field curl-free.

    ``matrices`` (2, 2, 2): for no transpose / transpose, the quadratic form of the curl energy in
    ``(cos θ, sin θ)``; ``angle_deg`` and ``transpose`` its minimum, ``uncertainty_deg`` the standard error,
    ``usable`` whether it may be used, and ``reason`` why not.
    """

    angle_deg: float
    transpose: bool
    uncertainty_deg: float
    usable: bool
    reason: str
    matrices: np.ndarray | None = None

    @property
    def precise(self) -> bool:
        """Usable with a standard error of at most ``ROTATION_PRECISE_DEG``."""
        return self.usable and self.uncertainty_deg <= ROTATION_PRECISE_DEG

    def curl_fraction(self, angles_deg: np.ndarray, transpose: bool) -> np.ndarray:
        """Share of the deflection field's energy that is curl (0: a pure gradient) after rotating by each angle."""
        if self.matrices is None:
            return np.full(np.shape(angles_deg), np.nan)
        m = self.matrices[int(transpose)]
        t = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
        c, s = np.cos(t), np.sin(t)
        return (c * c * m[0, 0] + 2 * c * s * m[0, 1] + s * s * m[1, 1]) / np.trace(m)


def _curl_matrix(x: np.ndarray, y: np.ndarray, u0: np.ndarray, u1: np.ndarray) -> np.ndarray:
    """Quadratic form (2, 2) of the transverse (curl) energy of the field (x, y) rotated by θ, in (cos θ, sin θ)."""
    shape = u0.shape
    fx, fy = np.fft.fft2(x, shape), np.fft.fft2(y, shape)
    a = u0 * fy - u1 * fx  # k̂ × F: the curl part of the field
    b = u0 * fx + u1 * fy  # k̂ × (F rotated by 90°) = k̂ · F
    ab = float(np.sum((a * b.conj()).real))
    return np.array([[float(np.sum(np.abs(a) ** 2)), ab], [ab, float(np.sum(np.abs(b) ** 2))]])


def fit_rotation(
    deflections: np.ndarray, scan_step: tuple[float, float], band_limit: float, transpose: bool | None = None
) -> RotationFit:
    """Scan rotation (deg, in (−90°, 90°]) and transpose that make the deflection field curl-free (module docstring).

    Parameters
    ----------
    deflections
        (Rx, Ry, 2) centres of mass minus the descan plane (detector pixels, any unit).
    scan_step
        (Å, Å).
    band_limit
        Largest spatial frequency of the signal (Å⁻¹).
    transpose
        Known transpose, or None to choose the one with less curl.

    Returns
    -------
    RotationFit, ``usable`` when the scan is at least 3×3 positions, the error at most ``ROTATION_USABLE_DEG`` and
    the transpose clear (``ROTATION_TRANSPOSE_RATIO``).
    """
    rx, ry = deflections.shape[:2]
    if min(rx, ry) < 3:
        return RotationFit(0.0, False, math.inf, False, f"a {rx}×{ry} scan is too small (at least 3×3 positions)")
    k0 = np.fft.fftfreq(2 * rx, scan_step[0])[:, None]
    k1 = np.fft.fftfreq(2 * ry, scan_step[1])[None, :]
    k = np.hypot(k0, k1)
    inside = (k > 0) & (k <= band_limit)
    safe = np.where(inside, k, 1.0)
    u0, u1 = np.where(inside, k0 / safe, 0.0), np.where(inside, k1 / safe, 0.0)
    x, y = deflections[..., 0], deflections[..., 1]
    matrices = np.stack([_curl_matrix(x, y, u0, u1), _curl_matrix(y, x, u0, u1)])
    fits = []
    for m in matrices:
        values, vectors = np.linalg.eigh(m)
        angle = (math.degrees(math.atan2(vectors[1, 0], vectors[0, 0])) + 90) % 180 - 90
        ratio = values[0] / values[1] if values[1] > 0 else 1.0
        sigma = math.degrees(math.sqrt(2 * ratio / max(1 - ratio, 1e-12) / (rx * ry)))
        fits.append((angle if angle > -90 else 90.0, ratio, sigma))
    best = int(fits[1][1] < fits[0][1]) if transpose is None else int(transpose)
    angle, ratio, sigma = fits[best]
    reasons = []
    if not sigma <= ROTATION_USABLE_DEG:
        reasons.append(f"its standard error {sigma:.2g}° exceeds {ROTATION_USABLE_DEG:g}° (too few positions or too "
                       "little deflection signal)")
    other = fits[1 - best][1]
    if transpose is None and not ratio <= ROTATION_TRANSPOSE_RATIO * other:
        reasons.append(f"the transpose is ambiguous (curl shares {fits[0][1]:.2f} and {fits[1][1]:.2f})")
    return RotationFit(angle, bool(best), sigma, not reasons, "; ".join(reasons), matrices)


def choose_rotation(
    fit: RotationFit, rotation_deg: float | None, transpose: bool | None
) -> tuple[float, bool, str]:
    """The rotation and transpose to use: the given ones; else the fit's when usable (with a warning when not
    precise); else 0° and no transpose, with a warning. Returns ``(rotation_deg, transpose, source)``, source
    ``"given"``, ``"estimated"`` or ``"fallback"``."""
    if rotation_deg is not None and transpose is not None:
        return float(rotation_deg), bool(transpose), "given"
    estimate = f"{fit.angle_deg:.1f}° ± {fit.uncertainty_deg:.2g}°{', transposed' if fit.transpose else ''}"
    advice = "pass rotation_deg= and transpose= (the microscope's scan rotation); see plot_rotation()"
    if fit.usable:
        if not fit.precise:
            warnings.warn(
                f"the scan rotation estimated from the centres of mass ({estimate}) is imprecise (standard error above "
                f"{ROTATION_PRECISE_DEG:g}°; every degree off blurs the image by about 2% of the patch width): "
                f"{advice}",
                stacklevel=3,
            )
        return (
            float(fit.angle_deg if rotation_deg is None else rotation_deg),
            bool(fit.transpose if transpose is None else transpose),
            "estimated",
        )
    rotation = float(rotation_deg or 0.0)
    warnings.warn(
        f"the scan rotation cannot be estimated from the centres of mass ({estimate}): {fit.reason}; using "
        f"{rotation:g}° and transpose={bool(transpose)}: {advice}",
        stacklevel=3,
    )
    return rotation, bool(transpose), "fallback"


def plot_rotation_fit(fit: RotationFit, used_deg: float, used_transpose: bool, figsize=(7, 3.5)):
    """Figure: the curl share of the deflection field versus the rotation (deg), as recorded and transposed, the
    estimate ± its standard error (band) and the rotation used (dashed). Returns the matplotlib figure."""
    angles = np.linspace(-90, 90, 361)
    fig, ax = plt.subplots(figsize=figsize)
    for transpose in (False, True):
        ax.plot(angles, fit.curl_fraction(angles, transpose), label="transposed" if transpose else "as recorded")
    ax.axvspan(fit.angle_deg - fit.uncertainty_deg, fit.angle_deg + fit.uncertainty_deg, color="0.85",
               label=f"estimate {fit.angle_deg:.1f}° ± {fit.uncertainty_deg:.2g}°")
    ax.axvline(used_deg, color="k", ls="--", label=f"used {used_deg:.1f}°{', transposed' if used_transpose else ''}")
    ax.set_xlabel("scan rotation (deg)")
    ax.set_ylabel("curl share of the deflection field")
    ax.set_xlim(-90, 90)
    title = "centre-of-mass rotation fit" if fit.usable else f"estimate unusable: {fit.reason}"
    ax.set_title(title[:100], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
