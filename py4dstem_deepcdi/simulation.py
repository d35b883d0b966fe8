"""The forward model of a pure phase object under a probe, and whole simulated 4D-STEM datasets.

Forward model (batched torch, CPU or CUDA through the same code):

    ψ(r) = P(r − δ) · exp(iφ(r))                 exit wave of a pure phase object, δ a sub-pixel probe shift
    I(k) = |FFT_unitary[ψ](k)|²,  Σ_k I = Σ_r |P|² = 1   (Parseval)
    counts ~ Poisson(N_e · I),  N_e = dose (e⁻/Å²) × step_x × step_y (Å²)  electrons per pattern
    target  φ − mean_mask(φ), set to 0 outside the illuminated mask

The network's input encoding of the counts lives in :mod:`~py4dstem_deepcdi.encoding`, the Poisson sampler in
:mod:`~py4dstem_deepcdi.poisson` and the training stream in :mod:`~py4dstem_deepcdi.stream`.

Diffraction patterns follow py4DSTEM's convention: the unshifted DC term sits at pixel (N//2, N//2), the real-space
window and probe are centred on the scan position, axis 0 of a pattern is axis 0 of the object (scan Rx).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import emdfile
import numpy as np
import torch

from .backend import torch_device
from .encoding import fourier_shift, remove_mask_mean
from .images import LatticeSource
from .io import calibrated_array
from .poisson import poisson
from .probe import ProbeGeometry
from .scan import calibrated_datacube, electrons_per_pattern, rotate_positions, scan_positions
from .seeds import seed_for

#: name of the ground-truth node that ``deepcdi simulate`` stores in the DataCube's tree, and of its positions
TRUTH_NAME = "ground_truth_phase"
TRUTH_POSITIONS_NAME = "ground_truth_positions"


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
        # fftshift of the far field = the exit wave times exp(2πi (r0 (N0//2)/N0 + r1 (N1//2)/N1)) ((-1)^(r0+r1) for
        # even N); that factor and the unitary FFT's 1/sqrt(N0 N1) are folded into the probe once
        r0 = torch.arange(n0, dtype=torch.float64)[:, None] * (n0 // 2) / n0
        r1 = torch.arange(n1, dtype=torch.float64)[None, :] * (n1 // 2) / n1
        modulation = torch.exp(2j * math.pi * (r0 + r1)) / math.sqrt(n0 * n1)
        self._modulation = modulation.to(torch.complex64).to(self.device)
        self._probe_modulated = (torch.as_tensor(geometry.probe, dtype=torch.complex128) * modulation).to(
            torch.complex64
        ).to(self.device)

    def shifted_probes(self, shifts_px: torch.Tensor, probes: torch.Tensor | None = None) -> torch.Tensor:
        """The probe (or ``probes`` (B, N, N)) translated by ``shifts_px`` (B, 2) pixels with a Fourier phase ramp,
        (B, N, N) complex."""
        probe = self.probe if probes is None else probes.to(self.device, torch.complex64)
        return fourier_shift(probe, shifts_px.to(self.device))

    def intensity(
        self, phase: torch.Tensor, shifts_px: torch.Tensor | None = None, probes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Noiseless diffraction intensity (B, N, N), DC at (N//2, N//2), each pattern summing to Σ|P|² = 1.

        ``phase`` (B, N, N) in rad on the window grid centred on the scan position; ``shifts_px`` optional
        sub-pixel probe shifts (B, 2); ``probes`` optional per-pattern probes (B, N, N) (centred, Σ|P|² = 1)
        instead of the geometry's.
        """
        if shifts_px is not None:
            probe = self.shifted_probes(shifts_px, probes).mul_(self._modulation)
        elif probes is not None:
            probe = probes.to(self.device, torch.complex64) * self._modulation
        else:
            probe = self._probe_modulated[None]
        phase = phase.to(self.device, torch.float32)
        exit_wave = torch.complex(torch.cos(phase), torch.sin(phase))
        if exit_wave.shape == torch.broadcast_shapes(exit_wave.shape, probe.shape):
            exit_wave.mul_(probe)
        else:
            exit_wave = exit_wave * probe
        far_field = torch.view_as_real(torch.fft.fft2(exit_wave))  # already unitary and fftshifted (see __init__)
        real, imag = far_field[..., 0], far_field[..., 1]
        return torch.mul(real, real).addcmul_(imag, imag)

    def neighbour_intensity(
        self, phase: torch.Tensor, offsets_px: torch.Tensor, probes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed noiseless intensity (B, N, N) of the probe at ``offsets_px`` (B, K, 2) pixels from the window's
        centre: ``Σ_k |FFT[P(r − δ_k) exp(iφ(r))]|²``, each term summing to 1 (the neighbours of a pooled input).

        ``phase`` (B, N, N) rad is the window about the centre position; ``probes`` optional (B, N, N) as in
        :meth:`intensity`. A probe shifted out of the window wraps around: the offsets must be small against the
        window.
        """
        probes = self.probe.expand(len(phase), -1, -1) if probes is None else probes
        total = torch.zeros(phase.shape, device=self.device)
        for k in range(offsets_px.shape[1]):
            total += self.intensity(phase, shifts_px=offsets_px[:, k], probes=probes)
        return total

    def target(
        self, phase: torch.Tensor, out: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Phase (rad) inside the illuminated mask with its mean over the mask removed, 0 outside (B, N, N).

        ``mask`` (B, N, N) or (N, N) replaces the geometry's mask (per-sample probes); ``out`` receives the result.
        """
        return remove_mask_mean(phase, self.mask if mask is None else mask, out=out)


def lattice_object(
    shape: tuple[int, int], sampling: float, phase_max: float = 0.5, seed: int = 0, **lattice_kwargs
) -> np.ndarray:
    """A synthetic atomic-lattice phase object (rad), ``shape`` pixels of ``sampling`` Å (random lattice from seed)."""
    generator = torch.Generator().manual_seed(int(seed))
    source = LatticeSource(amorphous_fraction=0.0, **lattice_kwargs)
    image = source.sample(1, tuple(shape), (sampling, sampling), generator)[0]
    return (image.numpy() * phase_max).astype(np.float32)


@dataclass
class SimulatedDataset:
    """A simulated 4D-STEM experiment: the DataCube and its ground truth.

    Attributes: ``datacube`` (py4DSTEM DataCube, calibrated: R in Å, Q in mrad), ``phase`` (ground-truth object
    phase, rad), ``sampling`` (object pixel size, Å), ``positions`` (J, 2) probe positions in Å in the object's
    frame (axis 0, axis 1), ``geometry``, ``electrons_per_pattern``, ``scan_step`` (Å), ``rotation_deg``;
    ``scan_positions`` (J, 2) the probe positions in Å in the scan's frame (before the scan rotation, as a
    measured position list is given: ``initial_scan_positions``), the raster grid plus any ``position_jitter``.
    """

    datacube: object
    phase: np.ndarray
    sampling: float
    positions: np.ndarray
    geometry: ProbeGeometry
    electrons_per_pattern: float
    scan_step: tuple[float, float]
    rotation_deg: float
    scan_positions: np.ndarray | None = None

    def truth_node(self, name: str = TRUTH_NAME) -> emdfile.Array:
        """The ground truth as an emdfile ``Array`` with its own calibration, to store beside the DataCube (whose R
        calibration is the scan step, not the object's pixel): values in rad, axes in Å of the object's frame
        (pixel × ``sampling``, origin at pixel 0), metadata ``ground_truth`` (``sampling_A``, ``scan_step_A``,
        ``rotation_deg``, ``electrons_per_pattern``, ``first_position_A``) and a child ``ground_truth_positions``
        (J, 2) Å: the probe positions in the same frame (scan order). Add it with ``datacube.tree(node)``; read it
        back with :func:`truth_from_node`."""
        node = calibrated_array(self.phase, name, "rad", dims=[self.sampling, self.sampling], dim_units=["A", "A"],
                                dim_names=["x", "y"])
        node.metadata = emdfile.Metadata(name="ground_truth", data={
            "sampling_A": float(self.sampling),
            "scan_step_A": [float(v) for v in self.scan_step],
            "rotation_deg": float(self.rotation_deg),
            "electrons_per_pattern": float(self.electrons_per_pattern),
            "first_position_A": [float(v) for v in self.positions[0]],
        })
        return node


def attach_truth(datacube, ds: SimulatedDataset) -> emdfile.Array:
    """Put the ground truth of ``ds`` (:meth:`SimulatedDataset.truth_node`) and its probe positions (Å, object frame)
    into the tree of ``datacube`` (which must be rooted, as a py4DSTEM DataCube is); returns the truth node."""
    node = ds.truth_node()
    datacube.tree(node)
    node.tree(calibrated_array(ds.positions, TRUTH_POSITIONS_NAME, "A", dim_names=["position", "axis"]))
    return node


def truth_from_node(node) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(phase rad, sampling Å, positions (J, 2) Å or None) of a stored ground truth (:func:`attach_truth`), the form
    the comparison takes as ``ground_truth``. The sampling is read from the node's own axis calibration."""
    dim = np.asarray(node.get_dim(0), dtype=np.float64)
    sampling = float(dim[1] - dim[0]) if len(dim) > 1 else 1.0
    positions = node.tree(TRUTH_POSITIONS_NAME).data if TRUTH_POSITIONS_NAME in node.treekeys else None
    return np.asarray(node.data), sampling, positions


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
    position_jitter: float = 0.0,
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
    device
        ``"cpu"`` or ``"gpu"``/``"cuda"``: where the patterns are computed.
    batch_size
        Patterns computed at once (bounds the memory).
    position_jitter
        Standard deviation (Å, default 0: a perfect raster) of a random displacement of every probe position along
        each scan axis (Gaussian, from ``seed``): a scan whose positions are only known by measurement
        (``SimulatedDataset.scan_positions``).

    Returns
    -------
    SimulatedDataset
        The calibrated DataCube (Rx, Ry, N, N) of counts and its ground truth.

    Raises
    ------
    ValueError
        If the electrons per pattern are not positive, ``scan_shape`` is not two positive integers, the real-space
        sampling is not square, ``position_jitter`` is negative or not finite, or ``phase`` is not 2-D or too small
        for the scan.
    """
    step = (scan_step, scan_step) if np.isscalar(scan_step) else tuple(scan_step)
    n_electrons = float(electrons) if electrons is not None else electrons_per_pattern(dose, step)
    if not (math.isfinite(n_electrons) and n_electrons > 0):
        raise ValueError(f"electrons must be positive, got {electrons!r}")
    if len(scan_shape) != 2 or min(scan_shape) < 1:
        raise ValueError(f"scan_shape must be two positive integers, got {scan_shape!r}")
    sampling = geometry.sampling[0]
    if abs(geometry.sampling[1] - sampling) > 1e-9 * sampling:
        raise ValueError("simulate_dataset needs a square detector (equal real-space sampling on both axes)")
    if not (math.isfinite(position_jitter) and position_jitter >= 0):
        raise ValueError(f"position_jitter must be a finite number >= 0 (Å), got {position_jitter!r}")
    n0, n1 = geometry.detector_shape
    measured = scan_positions(scan_shape, step)
    if position_jitter:
        measured += np.random.default_rng(seed_for(seed, 777)).normal(0.0, position_jitter, measured.shape)
    positions_px = rotate_positions(measured, rotation_deg) / sampling
    phase = _object_for_scan(phase, positions_px, (n0, n1), sampling, seed)
    model = ForwardModel(geometry, device)
    generator = torch.Generator(device=model.device).manual_seed(seed_for(seed, 12345)) if noise else None
    data = _scan_counts(model, phase, positions_px, n_electrons, generator, batch_size)
    return SimulatedDataset(
        datacube=calibrated_datacube(data.reshape(*scan_shape, n0, n1), step[0], geometry.angular_sampling),
        phase=phase,
        sampling=sampling,
        positions=positions_px * sampling,
        geometry=geometry,
        electrons_per_pattern=n_electrons,
        scan_step=step,
        rotation_deg=float(rotation_deg),
        scan_positions=measured,
    )


def _scan_counts(
    model: ForwardModel,
    phase: np.ndarray,
    positions_px: np.ndarray,
    electrons: float,
    generator: torch.Generator | None,
    batch_size: int,
) -> np.ndarray:
    """Counts (J, N, N) float32 of the probe at ``positions_px`` (J, 2) (object pixels) over the object ``phase``
    (rad): Poisson draws from ``generator``, or the expected counts when it is None."""
    n0, n1 = model.geometry.detector_shape
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
        expected = model.intensity(windows, shifts_px=pos - whole) * electrons
        counts = poisson(expected, generator) if generator is not None else expected
        data[start : start + len(pos)] = counts.cpu().numpy()
    return data


def _object_for_scan(
    phase: np.ndarray | None, positions_px: np.ndarray, window: tuple[int, int], sampling: float, seed: int
) -> np.ndarray:
    """The object phase (rad, float32) for the scan: ``phase`` checked, or a random lattice. ``positions_px`` (J, 2)
    is moved in place so that every window of shape ``window`` centred on a position lies inside the object."""
    margin = np.array(window) // 2 + 2
    positions_px += margin - positions_px.min(0)
    need = np.ceil(positions_px.max(0) + margin)
    if phase is None:
        phase = lattice_object(tuple(need.astype(int)), sampling, seed=seed)
    phase = np.asarray(phase, dtype=np.float32)
    if phase.ndim != 2:
        raise ValueError(f"phase must be a 2-D array, got shape {phase.shape}")
    if np.any(positions_px.max(0) + margin > phase.shape):
        raise ValueError(f"phase object {phase.shape} is too small for the scan; need {need}")
    return phase
