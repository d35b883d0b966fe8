"""The training stream: endless, seeded batches of simulated (input, target) pairs, and fixed HDF5 training sets.

Each sample: a phase object from :mod:`~py4dstem_deepcdi.images` scaled to a random peak-to-valley phase, a random
dose, the far-field intensity of :class:`~py4dstem_deepcdi.simulation.ForwardModel`, exact Poisson counts
(:func:`~py4dstem_deepcdi.poisson.poisson`), encoded as the network input of :mod:`~py4dstem_deepcdi.encoding`;
the target is the phase inside the illuminated mask with its mean removed. A probe-conditioned stream also draws
a probe per sample from :class:`~py4dstem_deepcdi.probe.AberrationRanges` (two more input channels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from .encoding import conditioning_mask, network_input, pooled_illumination, probe_channels
from .images import default_source
from .io import atomic_path
from .poisson import poisson
from .probe import AberrationRanges, ProbeGeometry, from_cartesian
from .scan import neighbour_offsets
from .seeds import seed_for
from .simulation import ForwardModel

EDGE_STEPS = 17  # aperture-edge widths tabulated across StreamConfig.edge_width_range


@dataclass
class StreamConfig:
    """How the training stream draws its samples.

    Parameters
    ----------
    electrons_range
        Range of electrons per pattern, drawn log-uniformly per sample (e⁻).
    phase_max_range
        Range of the peak-to-valley phase of the objects (rad), drawn per sample as ``phase_max_sampling`` says.
    phase_max_sampling
        ``"log"`` (default: log-uniform, as many objects between 0.05 and 0.1 rad as between 0.5 and 1 rad, for
        light-element samples whose phase is a few tenths of a radian) or ``"uniform"``.
    batch_size
        Samples per batch.
    mix
        Weights of the training-set sources ``photos``, ``lattice``, ``noise``.
    image_folder
        Folder of the user's own images replacing scikit-image's photographs.
    aberration_ranges
        For a probe-conditioned network: the ranges the probe of every sample is drawn from (an
        :class:`~py4dstem_deepcdi.probe.AberrationRanges` or its dict); the inputs then have 3 channels.
        None (default): every sample uses the geometry's probe.
    edge_width_range
        For a fixed-probe model with a modelled aperture: every sample's aperture edge is a linear ramp of a width
        (mrad) drawn uniformly from this range, centred on the semi-angle (:meth:`ProbeGeometry.aperture_edge`;
        one of ``EDGE_STEPS`` probes), so that the network does not depend on the exact edge of the data's
        bright-field disk (a sharp aperture seen by pixels, a detector's blur). None (default): the geometry's
        aperture.
    pool
        1 (default): the network sees one pattern. 3: a pooled network, which also sees the sum of the patterns
        of the position's 3×3 scan neighbourhood and their illumination (:func:`~py4dstem_deepcdi.encoding.
        pooled_illumination`): 9× the electrons for the phase of a dense scan (3 input channels).
    pool_step_range
        For a pooled network: the scan steps (Å) its neighbourhoods are drawn with, log-uniformly per sample, each
        at a uniformly random scan rotation.
    """

    electrons_range: tuple[float, float] = field(
        default=(2e4, 1e6), metadata={"help": "electrons per pattern (e⁻)", "flag": "--electrons"}
    )
    phase_max_range: tuple[float, float] = field(
        default=(0.03, 1.5), metadata={"help": "object phase range (rad)", "flag": "--phase-max"}
    )
    phase_max_sampling: str = field(default="log", metadata={
        "help": "how the object phase is drawn from --phase-max (log: more weak objects)",
        "choices": ("uniform", "log"),
    })  # fmt: skip
    batch_size: int = field(default=64, metadata={"help": "samples per batch"})
    mix: dict[str, float] = field(
        default_factory=lambda: {"photos": 0.5, "lattice": 0.35, "noise": 0.15},
        metadata={"help": "weights of the training-object sources"},
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "folder of your own training images", "flag": "--images"}
    )
    aberration_ranges: AberrationRanges | None = None
    edge_width_range: tuple[float, float] | None = field(default=None, metadata={
        "help": "draw each sample's aperture-edge width (mrad, centred on the semi-angle) from this range",
    })  # fmt: skip
    pool: int = field(default=1, metadata={
        "help": "3: train a pooled network, which also sees the summed 3x3 scan neighbourhood (for low dose)",
        "choices": (1, 3),
    })  # fmt: skip
    pool_step_range: tuple[float, float] = field(default=(0.1, 0.6), metadata={
        "help": "scan steps (Å) a pooled network's neighbourhoods are drawn with", "metavar": "Å",
    })  # fmt: skip

    def __post_init__(self):
        if isinstance(self.aberration_ranges, dict):
            self.aberration_ranges = AberrationRanges.from_dict(self.aberration_ranges)
        lo, hi = self.electrons_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(
                f"electrons_range must be an increasing pair of positive numbers, got {self.electrons_range}"
            )
        lo, hi = self.phase_max_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(
                f"phase_max_range must be an increasing pair of positive numbers (rad), got {self.phase_max_range}"
            )
        if self.phase_max_sampling not in ("uniform", "log"):
            raise ValueError(f"phase_max_sampling must be 'uniform' or 'log', got {self.phase_max_sampling!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.edge_width_range is not None:
            self.edge_width_range = tuple(float(v) for v in self.edge_width_range)
            lo, hi = self.edge_width_range
            if not (0 <= lo <= hi and math.isfinite(hi)):
                raise ValueError(
                    f"edge_width_range must be an increasing pair of widths >= 0 (mrad), got {self.edge_width_range}"
                )
            if self.aberration_ranges is not None:
                raise ValueError(
                    "edge_width_range is for fixed-probe models; a probe-conditioned one takes aberration_ranges"
                )
        if int(self.pool) not in (1, 3):
            raise ValueError(f"pool must be 1 (one pattern) or 3 (3×3 neighbourhoods), got {self.pool!r}")
        self.pool = int(self.pool)
        self.pool_step_range = tuple(float(v) for v in self.pool_step_range)
        lo, hi = self.pool_step_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"pool_step_range must be an increasing pair of steps > 0 (Å), got {self.pool_step_range}")
        if self.pool > 1 and self.aberration_ranges is not None:
            raise ValueError("a pooled network has a fixed probe; pool=3 and aberration_ranges cannot be combined")


#: The phase objects come from banks of at least ``_BANK_IMAGES`` source images, each bank serving the consecutive
#: batches that use each of its images ``_BANK_USES`` times on average, every time turned by a random one of the 8
#: symmetries of the square (4 of the rectangle): the objects cost 1/_BANK_USES of fresh ones. 0: fresh objects.
_BANK_IMAGES = 1024
_BANK_USES = 8


def _turned(images: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """``images`` (B, H, W) each turned in place by one of the symmetries of the square: ``turn`` 0-3 flip the rows
    (bit 1) and/or the columns (bit 2), 4-7 transpose first (H = W only)."""
    for t in range(1, 8):
        idx = torch.nonzero(turn == t).flatten()
        if len(idx):
            sub = images.index_select(0, idx)
            if t & 4:
                sub = sub.transpose(-2, -1)
            dims = [d for d, bit in ((-2, 1), (-1, 2)) if t & bit]
            images.index_copy_(0, idx, sub.flip(dims) if dims else sub.contiguous())
    return images


class TrainingStream:
    """Endless, seeded stream of ``(input, target)`` batches: inputs (B, C, N, N), targets (B, 1, N, N), float32.

    Batch ``k`` depends only on ``(seed, worker, k)``, so a stream restarted at ``start`` reproduces the same
    batches (exact resume), and workers with different ``worker`` ids draw different data. The phase objects of
    consecutive batches are drawn, with random symmetries of the square, from a bank of fresh source images, each
    used about ``_BANK_USES`` (8) times; phase scale, dose and Poisson noise are drawn for every sample.

    Parameters
    ----------
    geometry
        Probe and detector geometry; (N, N) is its ``detector_shape``.
    config
        How samples are drawn (default ``StreamConfig()``).
    seed, worker
        Seed of the stream and id of this worker.
    start
        Number of the first batch ``next`` returns.
    device
        ``"cpu"`` or ``"gpu"``/``"cuda"``.

    Raises
    ------
    ValueError
        If the config's aberration ranges do not fit the geometry's window, or ``edge_width_range`` is given for a
        geometry with a measured vacuum probe.
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
        if self.config.aberration_ranges is not None:
            self.config.aberration_ranges.check(geometry)
        self.source = default_source(self.config.image_folder, self.config.mix)
        self._edge_probes = None
        if self.config.edge_width_range is not None:
            if geometry.vacuum_probe_intensity is not None:
                raise ValueError(
                    "edge_width_range varies a modelled aperture; this geometry uses a measured vacuum probe"
                )
            widths = np.linspace(*self.config.edge_width_range, EDGE_STEPS)
            probes = np.stack(
                [geometry.replace(vacuum_probe_intensity=geometry.aperture_edge(w)).probe for w in widths]
            )
            self._edge_probes = torch.as_tensor(probes, dtype=torch.complex64, device=self.model.device)
        self.seed, self.worker, self.index = int(seed), int(worker), int(start)
        self._bank: tuple[tuple[int, int], torch.Tensor] | None = None  # ((bank number, batch size), images)

    def batch(self, index: int, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with number ``index`` (inputs (B, C, N, N), targets (B, 1, N, N), float32), reproducible.

        ``batch_size`` defaults to the config's. The objects come from a bank of images shared by consecutive
        batches. On the CPU the batch is simulated with one intra-op thread (torch's thread count is restored
        afterwards); run several workers for more throughput.
        """
        n = int(batch_size or self.config.batch_size)
        shape = self.model.geometry.detector_shape
        x = torch.empty(n, self.in_channels, *shape, device=self.model.device)
        y = torch.empty(n, 1, *shape, device=self.model.device)
        threads = torch.get_num_threads()
        single = self.model.device.type == "cpu" and threads > 1
        if single:
            torch.set_num_threads(1)
        try:
            bank = self._images_for(index, n)
            self._simulate(x, y[:, 0], seed_for(self.seed, self.worker, index), bank)
        finally:
            if single:
                torch.set_num_threads(threads)
        return x, y

    @property
    def in_channels(self) -> int:
        """Input channels of a batch: 1 (amplitude), or 3 (amplitude, Re P, Im P) for probe conditioning, or 3
        (amplitude, pooled amplitude, pooled illumination) for a pooled network."""
        return 1 if self.config.aberration_ranges is None and self.config.pool == 1 else 3

    @property
    def conditioned(self) -> bool:
        """Whether every sample has its own probe (and so its own illuminated mask)."""
        return self.config.aberration_ranges is not None

    def _probes(self, u: torch.Tensor) -> torch.Tensor:
        """Centred complex probes (B, N, N) for uniform numbers ``u`` (B, 7) mapped into the aberration ranges."""
        geometry = self.model.geometry
        vectors = self.config.aberration_ranges.from_uniform(u.cpu().numpy())
        probes = np.stack([geometry.replace(aberrations=from_cartesian(v)).probe for v in vectors])
        return torch.as_tensor(probes, dtype=torch.complex64, device=self.model.device)

    def _images_for(self, index: int, n: int) -> torch.Tensor | None:
        """The bank of object images (values in [0, 1]) of batch ``index`` of ``n`` samples, made when first needed."""
        if _BANK_USES < 1:
            return None
        size = max(_BANK_IMAGES, n)
        key = (index // max(1, round(_BANK_USES * size / n)), n)  # (bank number, batch size)
        if self._bank is None or self._bank[0] != key:
            geometry = self.model.geometry
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(seed_for(self.seed, self.worker, key[0], -1))  # never a batch's seed
            self._bank = None  # free the old bank first
            self._bank = (key, self.source.sample(size, geometry.detector_shape, geometry.sampling, generator))
        return self._bank[1]

    def _simulate(self, x: torch.Tensor, y: torch.Tensor, seed: int, bank: torch.Tensor | None) -> None:
        """Fill ``x`` (network inputs, (B, C, N, N)) and ``y`` (targets, (B, N, N)) with the samples of one random
        stream."""
        config = self.config
        n = len(x)
        geometry = self.model.geometry
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        device = generator.device
        if bank is None:
            images = self.source.sample(n, geometry.detector_shape, geometry.sampling, generator)
        else:
            pick = torch.randint(len(bank), (n,), generator=generator, device=device)
            turns = 8 if bank.shape[-1] == bank.shape[-2] else 4
            images = _turned(bank.index_select(0, pick), torch.randint(turns, (n,), generator=generator, device=device))
        lo, hi = config.phase_max_range
        u = torch.rand(n, 1, 1, generator=generator, device=device)
        phase_max = lo * (hi / lo) ** u if config.phase_max_sampling == "log" else lo + (hi - lo) * u
        phase = images.mul_(phase_max)
        log_lo, log_hi = math.log(config.electrons_range[0]), math.log(config.electrons_range[1])
        electrons = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=generator, device=device))
        probes = mask = None
        if config.aberration_ranges is not None:
            u = torch.rand(n, 7, generator=generator, device=device, dtype=torch.float64)
            probes = self._probes(u)
            x[:, 1:] = probe_channels(probes)
            mask = conditioning_mask(x, geometry.mask_threshold)[:, 0]
        if self._edge_probes is not None:
            pick = torch.randint(len(self._edge_probes), (n,), generator=generator, device=device)
            probes = self._edge_probes.index_select(0, pick)
        counts = poisson(self.model.intensity(phase, probes=probes).mul_(electrons[:, None, None]), generator)
        if config.pool > 1:
            self._pool(x, phase, counts, probes, electrons, generator)
        network_input(counts, electrons, out=x[:, 0])
        self.model.target(phase, out=y, mask=mask)

    def _pool(
        self,
        x: torch.Tensor,
        phase: torch.Tensor,
        counts: torch.Tensor,
        probes: torch.Tensor | None,
        electrons: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        """Fill the pooled channels of ``x``: the centre ``counts`` plus Poisson counts of its 8 neighbours (a sum of
        Poisson counts is the Poisson count of the summed intensities), and their illumination."""
        n, device = len(x), x.device
        geometry = self.model.geometry
        lo, hi = self.config.pool_step_range
        step = lo * (hi / lo) ** torch.rand(n, generator=generator, device=device).cpu()
        angle = 360 * torch.rand(n, generator=generator, device=device).cpu()
        sampling = np.asarray(geometry.sampling)
        offsets = torch.as_tensor(np.stack([
            neighbour_offsets(s, a) / sampling for s, a in zip(step.tolist(), angle.tolist())
        ]), dtype=torch.float32, device=device)  # (B, 9, 2) pixels, centre first
        centred = self.model.probe.expand(n, -1, -1) if probes is None else probes
        rest = self.model.neighbour_intensity(phase, offsets[:, 1:], centred)
        pooled = poisson(rest.mul_(electrons[:, None, None]), generator).add_(counts)
        network_input(pooled, electrons * offsets.shape[1], out=x[:, 1])
        x[:, 2] = pooled_illumination(centred, offsets)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.index)
        self.index += 1
        return out


def write_training_set(path: str | Path, stream: TrainingStream, n_samples: int, overwrite: bool = False) -> Path:
    """Write ``n_samples`` from ``stream`` to an HDF5 file (datasets ``inputs``, ``targets``, ``mask``).

    ``inputs`` has the stream's channels (3 for a probe-conditioned stream, whose per-sample masks follow from them
    with :func:`conditioning_mask`; ``mask`` is then the geometry's reference mask).

    The file carries the geometry as JSON in its attributes. Written to a temporary file and renamed, so a
    crash never leaves a half-written file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    n_samples = int(n_samples)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    shape = stream.model.geometry.detector_shape
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        inputs = f.create_dataset("inputs", (n_samples, stream.in_channels, *shape), dtype="float32")
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
    with h5py.File(path, "r") as f:
        return torch.from_numpy(f["inputs"][...]), torch.from_numpy(f["targets"][...]), f["mask"][...]
