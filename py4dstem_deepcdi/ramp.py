"""The stitched image's global phase ramp, anchored to the patterns' centres of mass (Ehrenfest's theorem).

Offset-only stitching leaves the image's long-range phase gradient to the network's per-patch tilts, whose small
errors add up into a ramp across the field of view (docs/benchmarks.md). The data measure that gradient directly: for
a thin object, exit wave ``ψ = P(r − R) exp(iφ(r))`` and far field ``Ψ = F[ψ]``, the centre of mass of the
diffraction intensity moves by the probe-weighted mean phase gradient under the probe (Ehrenfest's theorem, the basis
of DPC):

    Σ_k k |Ψ(k)|² / Σ_k |Ψ(k)|²  −  Σ_k k |P̃(k)|² / Σ_k |P̃(k)|²  =  (1/2π) Σ_r |P(r − R)|² ∇φ(r) / Σ_r |P|²,

``k`` in cycles per real-space pixel. On a detector of ``N`` pixels with the zero frequency at pixel ``N // 2``,
``k = (q − N // 2) / N``, so the mean gradient under pattern ``j`` is ``2π (CoM_j − CoM_probe) / N`` rad per pixel of
the real-space window (:func:`com_phase_gradients`). One pattern's centre of mass is noisy (≈ 0.003 rad/pixel at
10⁵ e⁻), and scattering beyond the detector biases it, so only the mean over the scan is used: :func:`anchor_ramp`
subtracts the plane that makes the image's probe-weighted gradients (:func:`probe_weighted_gradients`), averaged over
the scan positions, equal the measured average.

What the average measures depends on preprocessing. Centring the bright-field disk (``preprocess(centre=True)``)
fits and removes a plane of centres of mass over the scan, the descan, and with it the object's own mean tilt, which
no centre of mass can tell from descan or a beam tilt: the anchored gradient is then zero, which is right for a field
of view without a net phase gradient (a crystal, a 2-D material) and removes a real one (an edge, a wedge, a
smoothly varying object: measured in docs/benchmarks.md). On data without descan, ``centre=False`` keeps the
object's tilt in the centres of mass and the anchoring is right for any thin object.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, signal

from .preprocessing import centres_of_mass


def com_phase_gradients(
    intensities: np.ndarray, probe_intensity: np.ndarray, amplitudes: bool = False, chunk: int = 8192
) -> np.ndarray:
    """Probe-weighted mean phase gradient under each pattern from its centre of mass, (J, 2) rad/pixel (row, col).

    Parameters
    ----------
    intensities
        Diffraction intensities (J, N0, N1), zero frequency at pixel (N0 // 2, N1 // 2); any scale (counts).
    probe_intensity
        The probe's own far-field intensity (N0, N1) on the same detector (the vacuum pattern): its centre of mass
        is the zero of the gradient.
    amplitudes
        ``intensities`` hold amplitudes (the network input, √counts): square them (block by block).
    chunk
        Patterns per block (bounds memory).
    """
    intensities = np.asarray(intensities)
    if intensities.ndim != 3 or intensities.shape[1:] != np.shape(probe_intensity):
        raise ValueError(
            f"intensities must be (J, N0, N1) with the probe's detector shape {np.shape(probe_intensity)}, "
            f"got {intensities.shape}"
        )
    n0, n1 = intensities.shape[1:]
    reference = centres_of_mass(probe_intensity)
    power = 2 if amplitudes else 1
    com = np.concatenate(
        [
            centres_of_mass(intensities[i : i + chunk].astype(np.float64) ** power)
            for i in range(0, len(intensities), chunk)
        ]
    )
    return 2 * math.pi * (com - reference) / np.array([n0, n1])


def probe_weighted_gradients(
    image: np.ndarray, centres_px: np.ndarray, probe_intensity: np.ndarray, min_weight: float = 0.9
) -> tuple[np.ndarray, np.ndarray]:
    """The image's mean phase gradient under the probe at each position, (J, 2) rad/pixel, and which are valid (J,).

    ``Σ_u w(u) ∇φ(c_j + u − N // 2) / Σ_u w(u)`` with forward differences and ``w`` the probe intensity averaged
    onto them; ``centres_px`` (J, 2) are the image coordinates of the probe's centre pixel ``(N0 // 2, N1 // 2)``
    (bilinear between whole pixels). NaN pixels (outside the stitched area) are left out and the weights
    renormalised; a position is valid when at least ``min_weight`` of the probe's weight lies on finite differences.
    """
    image = np.asarray(image, dtype=np.float64)
    w = np.asarray(probe_intensity, dtype=np.float64)
    n0, n1 = w.shape
    centres_px = np.asarray(centres_px, dtype=np.float64)
    gradients, valid = [], np.ones(len(centres_px), dtype=bool)
    for axis in (0, 1):
        diff = np.full_like(image, np.nan)
        pair = np.zeros_like(w)
        if axis == 0:
            diff[:-1] = image[1:] - image[:-1]
            pair[:-1] = 0.5 * (w[1:] + w[:-1])
        else:
            diff[:, :-1] = image[:, 1:] - image[:, :-1]
            pair[:, :-1] = 0.5 * (w[:, 1:] + w[:, :-1])
        finite = np.isfinite(diff)
        kernel = pair[::-1, ::-1]  # full convolution with the flipped weight = correlation with the weight
        weighted = signal.fftconvolve(np.where(finite, diff, 0.0), kernel, mode="full")
        norm = signal.fftconvolve(finite.astype(np.float64), kernel, mode="full")
        # entry m of the full correlation is the window starting at image pixel m − (N − 1): centre c ↔ m = c + N
        # − 1 − N//2
        coords = (centres_px + np.array([n0 - 1 - n0 // 2, n1 - 1 - n1 // 2])).T
        num = ndimage.map_coordinates(weighted, coords, order=1, mode="constant", cval=0.0)
        den = ndimage.map_coordinates(norm, coords, order=1, mode="constant", cval=0.0)
        valid &= den >= min_weight * pair.sum()
        gradients.append(num / np.maximum(den, 1e-300))
    return np.stack(gradients, -1), valid


class UnanchorableRamp(ValueError):
    """No scan position sees enough of the stitched image to measure its phase gradient."""


def anchor_ramp(
    image: np.ndarray, centres_px: np.ndarray, probe_intensity: np.ndarray, measured: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the plane that gives the image the measured scan-averaged phase gradient.

    Parameters
    ----------
    image
        Stitched phase (rad), NaN where nothing was stitched.
    centres_px
        (J, 2) image coordinates of each pattern's probe centre.
    probe_intensity
        Real-space probe intensity (N0, N1), centred at (N0 // 2, N1 // 2).
    measured
        (J, 2) gradients from :func:`com_phase_gradients` (rad/pixel).

    Returns the corrected image (its mean over the finite pixels unchanged) and the gradient removed (rad/pixel,
    (row, col)).

    Raises
    ------
    UnanchorableRamp
        When no scan position has 90% of the probe's weight inside the stitched image.
    """
    measured = np.asarray(measured, dtype=np.float64)
    if measured.shape != np.shape(centres_px):
        raise ValueError(f"measured gradients {measured.shape} and centres {np.shape(centres_px)} differ in shape")
    gradients, valid = probe_weighted_gradients(image, centres_px, probe_intensity)
    if not valid.any():
        raise UnanchorableRamp(
            "no scan position has 90% of the probe's weight inside the stitched image (a scan too small for the "
            "probe, or a small stitch_fraction); the ramp cannot be anchored: reconstruct with anchor_ramp=False"
        )
    removed = gradients[valid].mean(0) - measured[valid].mean(0)
    rows, cols = np.indices(image.shape, dtype=np.float64)
    finite = np.isfinite(image)
    plane = removed[0] * (rows - rows[finite].mean()) + removed[1] * (cols - cols[finite].mean())
    return (image - plane).astype(image.dtype), removed
