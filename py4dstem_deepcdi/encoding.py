"""The network's input and output encoding, shared by training, inference and probe recovery.

input   x = sqrt(counts / N_e × N_pixels)            (N_e the expected electrons per pattern)
probe   [Re P, Im P] / max|P|                        (two extra channels of a probe-conditioned network)
mask    |P|² > threshold × max|P|²                   (the illuminated pixels, where the phase is learnt)
output  φ − mean_mask(φ) inside the mask, 0 outside  (the zero frequency of a pattern's phase is lost)
"""

from __future__ import annotations

import numpy as np
import torch


def network_input(
    counts: torch.Tensor, electrons: torch.Tensor | float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised amplitude fed to the network: ``sqrt(counts / electrons × N_pixels)`` per pattern.

    Parameters
    ----------
    counts
        Diffraction patterns (..., Qx, Qy) in counts (electrons); negative values are clipped to 0. Not modified.
    electrons
        Expected number of electrons per pattern: a scalar or one value per pattern (shape (B,)).
    out
        Optional tensor to write the result to (same shape as ``counts``).

    With this scaling a pattern's mean value is 1 whatever the dose: the dose shows only in the noise.
    """
    n_pixels = counts.shape[-1] * counts.shape[-2]
    electrons = torch.as_tensor(electrons, dtype=counts.dtype, device=counts.device).reshape(-1, 1, 1)
    scaled = counts.clamp_min(0).mul_(n_pixels / electrons)
    return torch.sqrt(scaled, out=out) if out is not None else scaled.sqrt_()


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
