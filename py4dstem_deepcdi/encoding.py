"""The network's input and output encoding, shared by training, inference and probe recovery.

input   x = sqrt(counts / N_e × N_pixels)            (N_e the expected electrons per pattern)
probe   [Re P, Im P] / max|P|                        (two extra channels of a probe-conditioned network)
mask    |P|² > threshold × max|P|²                   (the illuminated pixels, where the phase is learnt)
pooled  [x, sqrt(Σ_k counts_k / (K N_e) × N_pixels), Σ_k |P(r − δ_k)|² / max]
                                                     (a pooled network: the pattern, the sum of the K patterns of
                                                     its 3×3 scan neighbourhood (offsets δ_k), their illumination)
output  φ − mean_mask(φ) inside the mask, 0 outside  (the zero frequency of a pattern's phase is lost)
"""

from __future__ import annotations

import math

import numpy as np
import torch


def network_input(
    counts: torch.Tensor, electrons: torch.Tensor | float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised amplitude fed to the network: ``sqrt(counts / electrons × N_pixels)`` per pattern.

    Parameters
    ----------
    counts
        Diffraction patterns (..., Qx, Qy) in counts (electrons), a floating-point tensor; negative values are clipped
        to 0. Not modified.
    electrons
        Expected number of electrons per pattern, > 0: a scalar or one value per pattern (shape (B,) for counts
        (B, ..., Qx, Qy)).
    out
        Optional tensor to write the result to (same shape as ``counts``).

    With this scaling a pattern's mean value is 1 whatever the dose: the dose shows only in the noise.

    Raises
    ------
    TypeError
        ``counts`` that is not a floating-point torch tensor.
    ValueError
        ``counts`` of fewer than 2 dimensions; ``electrons`` not finite and positive, or neither one value nor one
        per pattern; NaN or infinite counts, or counts / electrons beyond the range of ``counts``' dtype.
    """
    if not isinstance(counts, torch.Tensor) or not counts.is_floating_point():
        got = counts.dtype if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise TypeError(f"counts must be a floating-point torch tensor (torch.from_numpy(array).float()), got {got}")
    if counts.dim() < 2:
        raise ValueError(f"counts must be diffraction patterns (..., Qx, Qy), got shape {tuple(counts.shape)}")
    n_pixels = counts.shape[-1] * counts.shape[-2]
    electrons = torch.as_tensor(electrons, dtype=counts.dtype, device=counts.device)
    if electrons.numel() == 1:
        electrons = electrons.reshape(())
    elif counts.dim() > 2 and electrons.numel() == counts.shape[0]:
        electrons = electrons.reshape(-1, *(1,) * (counts.dim() - 1))
    else:
        raise ValueError(
            f"electrons must be one number or one per pattern ({counts.shape[0] if counts.dim() > 2 else 1}), "
            f"got {electrons.numel()} values"
        )
    bad = ~(torch.isfinite(electrons) & (electrons > 0))
    if bool(bad.any()):
        first = float(electrons[bad].flatten()[0])
        raise ValueError(f"electrons per pattern must be finite and > 0 (in {counts.dtype}), got {first}")
    scaled = counts.clamp_min(0).mul_(n_pixels / electrons)
    result = torch.sqrt(scaled, out=out) if out is not None else scaled.sqrt_()
    if not bool(torch.isfinite(result).all()):
        raise ValueError(
            f"the network input is not finite: the counts hold NaN or infinite values, or counts / electrons exceed "
            f"the range of {counts.dtype}"
        )
    return result


def fourier_shift(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Complex images (..., N0, N1) translated by ``shifts_px`` (..., 2) pixels with a Fourier phase ramp (periodic)."""
    n0, n1 = images.shape[-2:]
    kx = torch.fft.fftfreq(n0, device=images.device)[:, None]
    ky = torch.fft.fftfreq(n1, device=images.device)[None, :]
    shifts_px = shifts_px.to(images.device, torch.float32)
    phase = kx * shifts_px[..., 0, None, None] + ky * shifts_px[..., 1, None, None]
    return torch.fft.ifft2(torch.fft.fft2(images) * torch.exp(-2j * math.pi * phase))


def pooled_illumination(probe: torch.Tensor, offsets_px: torch.Tensor) -> torch.Tensor:
    """The illumination channel of a pooled network: ``Σ_k |P(r − δ_k)|²`` scaled to a maximum of 1.

    ``probe`` (N, N) or (B, N, N) complex, centred; ``offsets_px`` (K, 2) or (B, K, 2) pixels. Returns (N, N) or
    (B, N, N) float32.
    """
    probe = torch.as_tensor(probe).to(torch.complex64)
    offsets = torch.as_tensor(offsets_px, dtype=torch.float32)
    shifted = fourier_shift(probe.unsqueeze(-3), offsets)
    total = shifted.abs().square().sum(-3)
    return (total / total.flatten(-2).amax(-1)[..., None, None].clamp_min(1e-30)).float()


def neighbour_sum(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts (Rx, Ry, N, N) summed over each position's 3×3 scan neighbourhood, and the number of patterns summed.

    Returns ``(pooled (Rx, Ry, N, N) float32, patterns (Rx, Ry) int)``: 9 inside the scan, 4 or 6 at its edges.
    """
    counts = np.asarray(counts, dtype=np.float32)
    if counts.ndim != 4:
        raise ValueError(f"neighbour_sum needs counts of shape (Rx, Ry, N, N), got {counts.shape}")
    rows = counts.copy()
    rows[1:] += counts[:-1]
    rows[:-1] += counts[1:]
    pooled = rows.copy()
    pooled[:, 1:] += rows[:, :-1]
    pooled[:, :-1] += rows[:, 1:]
    ones = np.ones(counts.shape[:2], dtype=np.int64)
    n_rows = ones.copy()
    n_rows[1:] += 1
    n_rows[:-1] += 1
    n_cols = ones.copy()
    n_cols[:, 1:] += 1
    n_cols[:, :-1] += 1
    return pooled, n_rows * n_cols


def probe_channels(probe: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The conditioning channels of a probe-conditioned network: (..., 2, N, N) float32 ``[Re P, Im P] / max|P|``.

    ``probe`` is the complex real-space probe (..., N, N), centred like :attr:`ProbeGeometry.probe`.
    """
    probe = torch.as_tensor(probe)
    peak = probe.abs().flatten(-2).amax(-1)[..., None, None].clamp_min(1e-30)
    scaled = probe / peak
    return torch.stack([scaled.real, scaled.imag], -3).float()


def conditioning_mask(inputs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Illuminated masks (B, 1, N, N) bool of a probe-conditioned batch (B, 3, N, N): ``|P|²/max|P|² > threshold``."""
    return (inputs[:, 1:2].square() + inputs[:, 2:3].square()) > threshold


def remove_mask_mean(phase: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(phase − mean of phase over mask) × mask``: the network's output convention.

    Parameters
    ----------
    phase
        Phase patches (..., N, N) in rad.
    mask
        The illuminated pixels: one (N, N) mask for every patch, or one per patch (broadcastable to ``phase``);
        bool or 0/1 values.
    out
        Optional tensor to write the result to.

    Returns
    -------
    The zero-mean phase inside the mask, 0 outside (rad), shape of ``phase``.
    """
    mask = mask.to(phase.dtype)
    if mask.dim() == 2:
        mean = (phase.flatten(-2) @ mask.flatten()) / mask.sum()
    else:
        mean = (phase * mask).sum((-2, -1)) / mask.sum((-2, -1))
    return torch.mul(phase - mean[..., None, None], mask, out=out)
