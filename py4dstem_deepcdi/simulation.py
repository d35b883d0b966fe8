"""The forward model and the simulated data: training stream, fixed HDF5 sets and whole 4D-STEM datasets.

Forward model (batched torch, CPU or CUDA through the same code):

    ψ(r) = P(r − δ) · exp(iφ(r))                 exit wave of a pure phase object, δ a sub-pixel probe shift
    I(k) = |FFT_unitary[ψ](k)|²,  Σ_k I = Σ_r |P|² = 1   (Parseval)
    counts ~ Poisson(N_e · I),  N_e = dose (e⁻/Å²) × step_x × step_y (Å²)  electrons per pattern
    network input  x = sqrt(counts / N_e × N_pixels)
    target         φ − mean_mask(φ), set to 0 outside the illuminated mask

Diffraction patterns follow py4DSTEM's convention: the unshifted DC term sits at pixel (N//2, N//2), the real-space
window and probe are centred on the scan position, axis 0 of a pattern is axis 0 of the object (scan Rx).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backend import torch_device
from .images import LatticeSource, default_source
from .probe import ProbeGeometry


def electrons_per_pattern(dose: float, scan_step: float | tuple[float, float]) -> float:
    """Electrons per diffraction pattern from a dose (e⁻/Å²) and the scan step (Å, scalar or (x, y))."""
    step_x, step_y = (scan_step, scan_step) if np.isscalar(scan_step) else scan_step
    for name, value in (("dose", dose), ("scan_step", step_x), ("scan_step", step_y)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(dose * step_x * step_y)


def network_input(counts: torch.Tensor, electrons: torch.Tensor | float) -> torch.Tensor:
    """Normalised amplitude fed to the network: ``sqrt(counts / electrons × N_pixels)`` (per pattern).

    ``electrons`` is the expected number of electrons per pattern (scalar or shape (B,)). With this scaling the
    input does not depend on the dose except through its noise.
    """
    n_pixels = counts.shape[-1] * counts.shape[-2]
    electrons = torch.as_tensor(electrons, dtype=counts.dtype, device=counts.device).reshape(-1, 1, 1)
    return counts.clamp_min(0).mul_(n_pixels / electrons).sqrt_()


class ForwardModel:
    """Far-field intensities of pure phase objects under one probe, on a torch device.

    Parameters
    ----------
    geometry
        The probe and detector geometry.
    device
        ``"cpu"`` or ``"gpu"``/``"cuda"``.
    """

    def __init__(self, geometry: ProbeGeometry, device: str = "cpu"):
        self.geometry = geometry
        self.device = torch_device(device)
        self.probe = torch.as_tensor(geometry.probe, dtype=torch.complex64, device=self.device)
        self.mask = torch.as_tensor(geometry.mask, device=self.device)
        n0, n1 = geometry.detector_shape
        self._kx = torch.fft.fftfreq(n0, device=self.device)[:, None]
        self._ky = torch.fft.fftfreq(n1, device=self.device)[None, :]
        # fftshift of the far field = the exit wave times exp(2πi (r0 (N0//2)/N0 + r1 (N1//2)/N1)) ((-1)^(r0+r1) for
        # even N); that factor and the unitary FFT's 1/sqrt(N0 N1) are folded into the probe once
        r0 = torch.arange(n0, dtype=torch.float64)[:, None] * (n0 // 2) / n0
        r1 = torch.arange(n1, dtype=torch.float64)[None, :] * (n1 // 2) / n1
        modulation = torch.exp(2j * math.pi * (r0 + r1)) / math.sqrt(n0 * n1)
        self._modulation = modulation.to(torch.complex64).to(self.device)
        self._probe_modulated = (torch.as_tensor(geometry.probe, dtype=torch.complex128) * modulation).to(
            torch.complex64
        ).to(self.device)

    def shifted_probes(self, shifts_px: torch.Tensor) -> torch.Tensor:
        """The probe translated by ``shifts_px`` (B, 2) pixels with a Fourier phase ramp, (B, N, N) complex."""
        shifts_px = shifts_px.to(self.device, torch.float32)
        ramp = torch.exp(
            -2j * math.pi * (self._kx[None] * shifts_px[:, 0, None, None] + self._ky[None] * shifts_px[:, 1, None, None])
        )
        return torch.fft.ifft2(torch.fft.fft2(self.probe)[None] * ramp)

    def intensity(self, phase: torch.Tensor, shifts_px: torch.Tensor | None = None) -> torch.Tensor:
        """Noiseless diffraction intensity (B, N, N), DC at (N//2, N//2), each pattern summing to Σ|P|² = 1.

        ``phase`` (B, N, N) in rad on the window grid centred on the scan position; ``shifts_px`` optional
        sub-pixel probe shifts (B, 2).
        """
        if shifts_px is None:
            probe = self._probe_modulated[None]
        else:
            probe = self.shifted_probes(shifts_px).mul_(self._modulation)
        phase = phase.to(self.device, torch.float32)
        exit_wave = torch.complex(torch.cos(phase), torch.sin(phase))
        if exit_wave.shape == torch.broadcast_shapes(exit_wave.shape, probe.shape):
            exit_wave.mul_(probe)
        else:
            exit_wave = exit_wave * probe
        far_field = torch.view_as_real(torch.fft.fft2(exit_wave))  # already unitary and fftshifted (see __init__)
        intensity = far_field[..., 0].square()
        return intensity.addcmul_(far_field[..., 1], far_field[..., 1])

    def target(self, phase: torch.Tensor) -> torch.Tensor:
        """Phase inside the illuminated mask with its mean over the mask removed, 0 outside (B, N, N)."""
        mask = self.mask.to(phase.dtype)
        mean = (phase.flatten(-2) @ mask.flatten()) / mask.sum()
        return (phase - mean[..., None, None]).mul_(mask)


@dataclass
class StreamConfig:
    """How the training stream draws its samples.

    Parameters
    ----------
    electrons_range
        Range of electrons per pattern, drawn log-uniformly per sample (e⁻).
    phase_max_range
        Range of the peak-to-valley phase of the objects (rad), drawn uniformly per sample.
    batch_size
        Samples per batch.
    mix
        Weights of the training-set sources ``photos``, ``lattice``, ``noise``.
    image_folder
        Folder of the user's own images replacing scikit-image's photographs.
    """

    electrons_range: tuple[float, float] = (2e4, 1e6)
    phase_max_range: tuple[float, float] = (0.1, 1.5)
    batch_size: int = 64
    mix: dict[str, float] = field(default_factory=lambda: {"photos": 0.5, "lattice": 0.35, "noise": 0.15})
    image_folder: str | None = None

    def __post_init__(self):
        lo, hi = self.electrons_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"electrons_range must be an increasing pair of positive numbers, got {self.electrons_range}")
        lo, hi = self.phase_max_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"phase_max_range must be an increasing pair of positive numbers (rad), got {self.phase_max_range}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _seed_for(*parts: int) -> int:
    """A 63-bit seed that differs for every tuple of integers (seed, worker, batch index)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) | (int(parts[0]) % (2**31)) << 32


class TrainingStream:
    """Endless, seeded stream of ``(input, target)`` batches, each of shape (B, 1, N, N), float32.

    Batch ``k`` depends only on ``(seed, worker, k)``, so a stream restarted at ``start`` reproduces the same
    batches (exact resume), and workers with different ``worker`` ids draw different data.
    """

    def __init__(
        self,
        geometry: ProbeGeometry,
        config: StreamConfig | None = None,
        seed: int = 0,
        worker: int = 0,
        start: int = 0,
        device: str = "cpu",
    ):
        self.model = ForwardModel(geometry, device)
        self.config = config or StreamConfig()
        self.source = default_source(self.config.image_folder, self.config.mix)
        self.seed, self.worker, self.index = int(seed), int(worker), int(start)

    def batch(self, index: int, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with number ``index`` (inputs, targets), reproducible."""
        config = self.config
        n = int(batch_size or config.batch_size)
        geometry = self.model.geometry
        generator = torch.Generator(device=self.model.device).manual_seed(_seed_for(self.seed, self.worker, index))
        images = self.source.sample(n, geometry.detector_shape, geometry.sampling, generator)
        lo, hi = config.phase_max_range
        phase_max = lo + (hi - lo) * torch.rand(n, 1, 1, generator=generator, device=generator.device)
        phase = images.mul_(phase_max)
        log_lo, log_hi = math.log(config.electrons_range[0]), math.log(config.electrons_range[1])
        electrons = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=generator, device=generator.device))
        counts = _poisson(self.model.intensity(phase).mul_(electrons[:, None, None]), generator)
        x = counts.mul_((geometry.detector_shape[0] * geometry.detector_shape[1] / electrons)[:, None, None]).sqrt_()
        return x[:, None], self.model.target(phase)[:, None]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.index)
        self.index += 1
        return out


# ---------------------------------------------------------------------------------------------- Poisson counts

_TABLE_RATE = 16.0  # below: table-guided inversion; from here on: transformed rejection (PTRS, valid for λ >= 10)
_RATE_CELLS = 1024  # λ cells of 1/64: λ·64 is exact in float32
_UNIFORM_CELLS = 1024  # uniform cells of 1/1024: exact, torch.rand floats are multiples of 2^-24
_INVERSION_TABLE: list[torch.Tensor] = []


def _inversion_table() -> torch.Tensor:
    """Poisson quantiles per cell of (λ, u): ``k`` where ``min{k: u < F(k; λ)}`` is the same all over the cell,
    -1 where it is not (and in the last row, λ >= _TABLE_RATE). Flat int8, row-major (λ cell, u cell)."""
    if not _INVERSION_TABLE:
        rate = torch.arange(_RATE_CELLS + 1, dtype=torch.float64) * (_TABLE_RATE / _RATE_CELLS)  # cell edges
        k = torch.arange(64, dtype=torch.float64)
        log_pmf = -rate[:, None] + k * torch.log(rate[:, None].clamp_min(1e-300)) - torch.lgamma(k + 1)
        cdf = torch.exp(log_pmf).cumsum(1)
        cdf[0] = 1.0  # λ = 0
        u = torch.arange(_UNIFORM_CELLS + 1, dtype=torch.float64) / _UNIFORM_CELLS
        quantile = torch.searchsorted(cdf, u.expand(_RATE_CELLS + 1, -1).contiguous(), right=True)
        # the quantile grows with λ and u: one value over a cell if its two extreme corners agree
        low, high = quantile[:-1, :-1], quantile[1:, 1:]
        table = torch.where(low == high, low, -1).to(torch.int8)
        _INVERSION_TABLE.append(torch.cat([table, torch.full((1, _UNIFORM_CELLS), -1, dtype=torch.int8)]).flatten())
    return _INVERSION_TABLE[0]


def _poisson_inversion(rate: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``min{k: u < F(k; λ)}`` by sequential search in float64 (for λ < _TABLE_RATE)."""
    rate, u = rate.double(), u.double()
    p = torch.exp(-rate)
    cdf = p.clone()
    k = out = torch.zeros_like(rate)
    todo = None  # the elements in k, rate, ... (None: all)
    for j in range(1, 200):
        more = cdf <= u
        if not bool(more.any()):
            break
        if j % 8 == 0:  # drop the finished elements now and then
            keep = more.nonzero().flatten()
            if todo is not None:
                out.index_copy_(0, todo, k)
            todo = keep if todo is None else todo[keep]
            rate, u, p, cdf, k, more = (t[keep] for t in (rate, u, p, cdf, k, more))
        k += more
        p *= rate / j
        cdf += p
    return out if todo is None else out.index_copy_(0, todo, k)


def _poisson_ptrs(rate: torch.Tensor, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson counts for λ >= 10 by Hörmann's transformed rejection with squeeze (PTRS, 1993), vectorised.

    ``v`` holds one uniform per element for the first attempt. Elements rejected get several attempts per round
    after that (the first accepted one counts), so few rounds are needed.
    """
    out = torch.empty_like(rate)
    todo = None  # the elements still without a count (None: all)
    attempts = 1
    while True:
        lam = rate if todo is None else rate.index_select(0, todo)
        m = lam.numel()
        if m == 0:
            return out
        lam = lam[:, None]
        b = lam.sqrt().mul_(2.53).add_(0.931)
        a = b.mul(0.02483).sub_(0.059)
        vr = (b - 2).reciprocal_().mul_(-3.6224).add_(0.9277)
        u = torch.rand(m, attempts, generator=generator).sub_(0.5)
        if v is None:
            v = torch.rand(m, attempts, generator=generator)
        else:
            v = v[:, None]
        us = u.abs().neg_().add_(0.5)
        k = torch.div(a * 2, us).add_(b).mul_(u).add_(lam).add_(0.43).floor_()
        accept = (us >= 0.07) & (v <= vr)
        slow = (~accept).nonzero()
        if len(slow):
            row, col = slow[:, 0], slow[:, 1]
            ks, uss, vs = k[row, col].double(), us[row, col].double(), v[row, col].double()
            ls, bs = lam[row, 0].double(), b[row, 0].double()
            as_ = bs * 0.02483 - 0.059
            inv_alpha = 1.1239 + 1.1328 / (bs - 3.4)
            lhs = torch.log(vs * inv_alpha / (as_ / (uss * uss) + bs))
            rhs = -ls + ks * torch.log(ls) - torch.lgamma(ks + 1)
            ok = (ks >= 0) & ((uss >= 0.013) | (vs <= uss)) & (lhs <= rhs)
            accept[row, col] = ok
        if attempts == 1:
            done, count = accept[:, 0], k[:, 0]
        else:
            done = accept.any(1)
            count = k.gather(1, accept.to(torch.uint8).argmax(1, keepdim=True))[:, 0]
        if todo is None:
            out.copy_(count)
            todo = (~done).nonzero().flatten()
        else:
            out.index_copy_(0, todo, count)  # the rejected ones are overwritten later
            todo = todo[~done]
        v, attempts = None, (2 if attempts == 1 else 4)


def _poisson(rate: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson counts with means ``rate`` (>= 0), float32, exact.

    On a GPU this is ``torch.poisson``. On the CPU, where that samples element by element, a vectorised sampler:
    inversion ``min{k: u < F(k; λ)}`` looked up in a table of (λ, u) cells where the cell decides ``k``, by sequential
    search where it does not (a few percent), and Hörmann's PTRS rejection for λ >= 16.
    """
    if rate.device.type != "cpu":
        return torch.poisson(rate, generator=generator)
    flat = rate.reshape(-1).float()
    u = torch.rand(flat.shape, generator=generator)
    cell = (flat * (_RATE_CELLS / _TABLE_RATE)).clamp_(max=_RATE_CELLS).to(torch.int32).mul_(_UNIFORM_CELLS)
    cell += (u * _UNIFORM_CELLS).to(torch.int32)
    quantile = _inversion_table().index_select(0, cell)
    out = quantile.to(torch.float32)
    rest = (quantile < 0).nonzero().flatten()
    if len(rest):
        lam, v = flat[rest], u[rest]
        big = lam >= _TABLE_RATE
        large, small = big.nonzero().flatten(), (~big).nonzero().flatten()
        if len(large):
            out.index_copy_(0, rest[large], _poisson_ptrs(lam[large], v[large], generator))
        if len(small):
            out.index_copy_(0, rest[small], _poisson_inversion(lam[small], v[small]).float())
    return out.reshape(rate.shape)


def write_training_set(path: str | Path, stream: TrainingStream, n_samples: int, overwrite: bool = False) -> Path:
    """Write ``n_samples`` from ``stream`` to an HDF5 file (datasets ``inputs``, ``targets``, ``mask``).

    The file carries the geometry as JSON in its attributes. Written to a temporary file and renamed, so a
    crash never leaves a half-written file.
    """
    import json  # noqa: PLC0415

    import h5py  # noqa: PLC0415

    from .io import atomic_path  # noqa: PLC0415

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    n_samples = int(n_samples)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    shape = stream.model.geometry.detector_shape
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        inputs = f.create_dataset("inputs", (n_samples, 1, *shape), dtype="float32")
        targets = f.create_dataset("targets", (n_samples, 1, *shape), dtype="float32")
        f.create_dataset("mask", data=stream.model.geometry.mask)
        f.attrs["geometry"] = json.dumps(stream.model.geometry.to_dict())
        f.attrs["seed"], f.attrs["worker"] = stream.seed, stream.worker
        done = 0
        while done < n_samples:
            x, y = next(stream)
            k = min(len(x), n_samples - done)
            inputs[done : done + k] = x[:k].cpu().numpy()
            targets[done : done + k] = y[:k].cpu().numpy()
            done += k
    return path


def read_training_set(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Read a file written by :func:`write_training_set`: (inputs, targets, mask)."""
    import h5py  # noqa: PLC0415

    with h5py.File(path, "r") as f:
        return torch.from_numpy(f["inputs"][...]), torch.from_numpy(f["targets"][...]), f["mask"][...]


# ---------------------------------------------------------------------------------------------- whole datasets


def lattice_object(
    shape: tuple[int, int], sampling: float, phase_max: float = 0.5, seed: int = 0, **lattice_kwargs
) -> np.ndarray:
    """A synthetic atomic-lattice phase object (rad), ``shape`` pixels of ``sampling`` Å (random lattice from seed)."""
    generator = torch.Generator().manual_seed(int(seed))
    source = LatticeSource(amorphous_fraction=0.0, **lattice_kwargs)
    image = source.sample(1, tuple(shape), (sampling, sampling), generator)[0]
    return (image.numpy() * phase_max).astype(np.float32)


def scan_positions(
    scan_shape: tuple[int, int],
    scan_step: float | tuple[float, float],
    rotation_deg: float = 0.0,
    transpose: bool = False,
) -> np.ndarray:
    """Raster-scan probe positions (Rx*Ry, 2) in Å in the detector's frame.

    The scan grid is rotated by ``rotation_deg`` about its centre and optionally transposed, with the same
    convention (and the same code, py4DSTEM's ``AffineTransform``) as py4DSTEM's ptychography uses for
    ``force_com_rotation`` and ``force_com_transpose``.
    """
    from py4DSTEM.process.phase.utils import AffineTransform  # noqa: PLC0415

    step_x, step_y = (scan_step, scan_step) if np.isscalar(scan_step) else scan_step
    x, y = np.meshgrid(np.arange(scan_shape[0]) * step_x, np.arange(scan_shape[1]) * step_y, indexing="ij")
    positions = np.stack([x.ravel(), y.ravel()], -1).astype(np.float64)
    if rotation_deg:
        positions = np.asarray(AffineTransform(angle=np.deg2rad(rotation_deg))(positions, positions.mean(0)), np.float64)
    if transpose:
        positions = np.flip(positions, 1)
    return positions


@dataclass
class SimulatedDataset:
    """A simulated 4D-STEM experiment: the DataCube and its ground truth.

    Attributes: ``datacube`` (py4DSTEM DataCube, calibrated: R in Å, Q in mrad), ``phase`` (ground-truth object
    phase, rad), ``sampling`` (object pixel size, Å), ``positions`` (J, 2) probe positions in Å in the object's
    frame (axis 0, axis 1), ``geometry``, ``electrons_per_pattern``.
    """

    datacube: object
    phase: np.ndarray
    sampling: float
    positions: np.ndarray
    geometry: ProbeGeometry
    electrons_per_pattern: float
    scan_step: tuple[float, float]
    rotation_deg: float


def simulate_dataset(
    geometry: ProbeGeometry,
    scan_shape: tuple[int, int] = (32, 32),
    scan_step: float | tuple[float, float] = 0.25,
    dose: float | None = 1.6e6,
    electrons: float | None = None,
    phase: np.ndarray | None = None,
    rotation_deg: float = 0.0,
    seed: int = 0,
    noise: bool = True,
    device: str = "cpu",
    batch_size: int = 1024,
) -> SimulatedDataset:
    """Simulate a 4D-STEM scan over a phase object with this package's forward model.

    Parameters
    ----------
    geometry
        Probe and detector geometry; the object is sampled at ``geometry.sampling``.
    scan_shape
        Probe positions (Rx, Ry).
    scan_step
        Scan step (Å), scalar or (x, y).
    dose
        Dose (e⁻/Å²); the electrons per pattern are ``dose × step_x × step_y``. Ignored if ``electrons`` is given.
    electrons
        Electrons per pattern, overriding ``dose``.
    phase
        Object phase (rad) on the ``geometry.sampling`` grid, large enough for the scan plus a window; default a
        random lattice (see :func:`lattice_object`).
    rotation_deg
        Rotation of the scan axes relative to the object axes (deg).
    seed
        Seed of the lattice and the Poisson noise.
    noise
        Poisson noise on (True) or the expected counts (False).
    """
    import py4DSTEM  # noqa: PLC0415

    step = (scan_step, scan_step) if np.isscalar(scan_step) else tuple(scan_step)
    n_electrons = float(electrons) if electrons is not None else electrons_per_pattern(dose, step)
    if not (math.isfinite(n_electrons) and n_electrons > 0):
        raise ValueError(f"electrons must be positive, got {electrons!r}")
    if len(scan_shape) != 2 or min(scan_shape) < 1:
        raise ValueError(f"scan_shape must be two positive integers, got {scan_shape!r}")
    sampling = geometry.sampling[0]
    if abs(geometry.sampling[1] - sampling) > 1e-9 * sampling:
        raise ValueError("simulate_dataset needs a square detector (equal real-space sampling on both axes)")
    n0, n1 = geometry.detector_shape
    positions = scan_positions(scan_shape, step, rotation_deg)
    margin = np.array([n0, n1]) // 2 + 2
    positions_px = positions / sampling
    positions_px += margin - positions_px.min(0)
    if phase is None:
        extent = np.ceil(positions_px.max(0) + margin).astype(int)
        phase = lattice_object(tuple(extent), sampling, seed=seed)
    phase = np.asarray(phase, dtype=np.float32)
    if phase.ndim != 2:
        raise ValueError(f"phase must be a 2-D array, got shape {phase.shape}")
    if np.any(positions_px.max(0) + margin > phase.shape):
        raise ValueError(f"phase object {phase.shape} is too small for the scan; need {np.ceil(positions_px.max(0) + margin)}")

    model = ForwardModel(geometry, device)
    generator = torch.Generator(device=model.device).manual_seed(_seed_for(seed, 12345))
    obj = torch.as_tensor(phase, device=model.device)
    rows = torch.arange(n0, device=model.device) - n0 // 2
    cols = torch.arange(n1, device=model.device) - n1 // 2
    data = np.empty((len(positions_px), n0, n1), dtype=np.float32)
    for start in range(0, len(positions_px), batch_size):
        pos = torch.as_tensor(positions_px[start : start + batch_size], device=model.device)
        whole = torch.round(pos)
        r = (whole[:, 0, None] + rows[None]).long()
        c = (whole[:, 1, None] + cols[None]).long()
        windows = obj[r[:, :, None], c[:, None, :]]
        intensity = model.intensity(windows, shifts_px=pos - whole)
        expected = intensity * n_electrons
        counts = _poisson(expected, generator) if noise else expected
        data[start : start + len(pos)] = counts.cpu().numpy()

    datacube = py4DSTEM.DataCube(data=data.reshape(*scan_shape, n0, n1))
    datacube.calibration.set_R_pixel_size(float(step[0]))
    datacube.calibration.set_R_pixel_units("A")
    datacube.calibration.set_Q_pixel_size(float(geometry.angular_sampling))
    datacube.calibration.set_Q_pixel_units("mrad")
    return SimulatedDataset(
        datacube=datacube,
        phase=phase,
        sampling=sampling,
        positions=positions_px * sampling,
        geometry=geometry,
        electrons_per_pattern=n_electrons,
        scan_step=step,
        rotation_deg=float(rotation_deg),
    )
