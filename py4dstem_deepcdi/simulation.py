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
    return torch.sqrt(counts.clamp_min(0) / electrons * n_pixels)


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
        probe = self.probe[None] if shifts_px is None else self.shifted_probes(shifts_px)
        exit_wave = probe * torch.exp(1j * phase.to(self.device, torch.float32))
        far_field = torch.fft.fft2(exit_wave, norm="ortho")
        return torch.fft.fftshift(far_field.real**2 + far_field.imag**2, dim=(-2, -1))

    def target(self, phase: torch.Tensor) -> torch.Tensor:
        """Phase inside the illuminated mask with its mean over the mask removed, 0 outside (B, N, N)."""
        mask = self.mask.to(phase.dtype)
        mean = (phase * mask).sum((-2, -1), keepdim=True) / mask.sum()
        return (phase - mean) * mask


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
        phase = images * phase_max
        log_lo, log_hi = math.log(config.electrons_range[0]), math.log(config.electrons_range[1])
        electrons = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=generator, device=generator.device))
        intensity = self.model.intensity(phase)
        counts = torch.poisson(intensity * electrons[:, None, None], generator=generator)
        x = network_input(counts, electrons)
        return x[:, None], self.model.target(phase)[:, None]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.index)
        self.index += 1
        return out


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
    # LatticeSource renders on a grid twice the requested size internally; large objects are rendered whole.
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
        counts = torch.poisson(expected, generator=generator) if noise else expected
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
