"""The forward model and the simulated data: training stream, fixed HDF5 sets and whole 4D-STEM datasets.

Forward model (batched torch, CPU or CUDA through the same code):

    ψ(r) = P(r − δ) · exp(iφ(r))                 exit wave of a pure phase object, δ a sub-pixel probe shift
    I(k) = |FFT_unitary[ψ](k)|²,  Σ_k I = Σ_r |P|² = 1   (Parseval)
    counts ~ Poisson(N_e · I),  N_e = dose (e⁻/Å²) × step_x × step_y (Å²)  electrons per pattern
    network input  x = sqrt(counts / N_e × N_pixels)
    target         φ − mean_mask(φ), set to 0 outside the illuminated mask

A probe-conditioned network also sees the probe: two more input channels, Re P(r) and Im P(r) divided by max|P|
(:func:`probe_channels`), drawn per sample from :class:`~py4dstem_deepcdi.probe.AberrationRanges`; its illuminated
mask, |P|² > threshold × max|P|², is then read back from those channels (:func:`conditioning_mask`).

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
from .encoding import conditioning_mask, network_input, probe_channels, remove_mask_mean
from .probe import AberrationRanges, ProbeGeometry, from_cartesian
from .scan import electrons_per_pattern, scan_positions


EDGE_STEPS = 17  # aperture-edge widths tabulated across StreamConfig.edge_width_range


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

    def shifted_probes(self, shifts_px: torch.Tensor, probes: torch.Tensor | None = None) -> torch.Tensor:
        """The probe (or ``probes`` (B, N, N)) translated by ``shifts_px`` (B, 2) pixels with a Fourier phase ramp,
        (B, N, N) complex."""
        shifts_px = shifts_px.to(self.device, torch.float32)
        ramp = torch.exp(
            -2j * math.pi * (self._kx[None] * shifts_px[:, 0, None, None] + self._ky[None] * shifts_px[:, 1, None, None])
        )
        probe = self.probe if probes is None else probes.to(self.device, torch.complex64)
        return torch.fft.ifft2(torch.fft.fft2(probe) * ramp)

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

    def target(self, phase: torch.Tensor) -> torch.Tensor:
        """Phase inside the illuminated mask with its mean over the mask removed, 0 outside (B, N, N)."""
        return self._target(phase)

    def _target(self, phase: torch.Tensor, out: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return remove_mask_mean(phase, self.mask if mask is None else mask, out=out)


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
        ``"log"`` (default) or ``"uniform"`` (log-uniform: as many objects between 0.05 and 0.1 rad as between 0.5 and 1 rad,
        for light-element samples whose phase is a few tenths of a radian).
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
    """

    electrons_range: tuple[float, float] = (2e4, 1e6)
    phase_max_range: tuple[float, float] = (0.03, 1.5)
    phase_max_sampling: str = "log"
    batch_size: int = 64
    mix: dict[str, float] = field(default_factory=lambda: {"photos": 0.5, "lattice": 0.35, "noise": 0.15})
    image_folder: str | None = None
    aberration_ranges: AberrationRanges | None = None
    edge_width_range: tuple[float, float] | None = None

    def __post_init__(self):
        if isinstance(self.aberration_ranges, dict):
            self.aberration_ranges = AberrationRanges.from_dict(self.aberration_ranges)
        lo, hi = self.electrons_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"electrons_range must be an increasing pair of positive numbers, got {self.electrons_range}")
        lo, hi = self.phase_max_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"phase_max_range must be an increasing pair of positive numbers (rad), got {self.phase_max_range}")
        if self.phase_max_sampling not in ("uniform", "log"):
            raise ValueError(f"phase_max_sampling must be 'uniform' or 'log', got {self.phase_max_sampling!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.edge_width_range is not None:
            self.edge_width_range = tuple(float(v) for v in self.edge_width_range)
            lo, hi = self.edge_width_range
            if not (0 <= lo <= hi and math.isfinite(hi)):
                raise ValueError(f"edge_width_range must be an increasing pair of widths >= 0 (mrad), got {self.edge_width_range}")
            if self.aberration_ranges is not None:
                raise ValueError("edge_width_range is for fixed-probe models; a probe-conditioned one takes aberration_ranges")


def _seed_for(*parts: int) -> int:
    """A 63-bit seed that differs for every tuple of integers (seed, worker, batch index)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) | (int(parts[0]) % (2**31)) << 32


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
    """Endless, seeded stream of ``(input, target)`` batches, each of shape (B, 1, N, N), float32.

    Batch ``k`` depends only on ``(seed, worker, k)``, so a stream restarted at ``start`` reproduces the same
    batches (exact resume), and workers with different ``worker`` ids draw different data. The phase objects of
    consecutive batches are drawn, with random symmetries of the square, from a bank of fresh source images, each
    used about 8 times (see ``_BANK_USES``); phase scale, dose and Poisson noise are drawn for every sample.
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
                raise ValueError("edge_width_range varies a modelled aperture; this geometry uses a measured vacuum probe")
            widths = np.linspace(*self.config.edge_width_range, EDGE_STEPS)
            probes = np.stack([geometry.replace(vacuum_probe_intensity=geometry.aperture_edge(w)).probe for w in widths])
            self._edge_probes = torch.as_tensor(probes, dtype=torch.complex64, device=self.model.device)
        self.seed, self.worker, self.index = int(seed), int(worker), int(start)
        self._bank: tuple[tuple[int, int], torch.Tensor] | None = None  # ((bank number, batch size), images)

    def batch(self, index: int, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with number ``index`` (inputs, targets), reproducible.

        The objects come from a bank of images shared by consecutive batches. On the CPU the batch is simulated with
        single-threaded torch operations: they are too small to gain from intra-op threads, which only wait for each
        other on a busy machine (run several workers for more).
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
            self._simulate(x, y[:, 0], _seed_for(self.seed, self.worker, index), bank)
        finally:
            if single:
                torch.set_num_threads(threads)
        return x, y

    @property
    def in_channels(self) -> int:
        """Input channels of a batch: 1 (amplitude), or 3 (amplitude, Re P, Im P) for probe conditioning."""
        return 1 if self.config.aberration_ranges is None else 3

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
            generator.manual_seed(_seed_for(self.seed, self.worker, key[0], -1))  # never a batch's seed
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
        counts = _poisson(self.model.intensity(phase, probes=probes).mul_(electrons[:, None, None]), generator)
        network_input(counts, electrons, out=x[:, 0])
        self.model._target(phase, out=y, mask=mask)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.index)
        self.index += 1
        return out


# ---------------------------------------------------------------------------------------------- Poisson counts

_TABLE_RATE = 16.0  # rates below: inversion guided by tables; from here on: torch.poisson (transformed rejection)
_RATE_CELLS = 1024  # λ cells of 1/64 (λ·64 is exact in float32)
_UNIFORM_BITS = 10  # uniform cells of 2^-10
_K_MAX = 64  # F(63; 16) = 1 - 1e-20: no count below λ = 16 reaches it
_TABLES: dict[str, torch.Tensor] = {}


def _poisson_tables() -> dict[str, torch.Tensor]:
    """The tables of the CPU Poisson sampler, built once.

    ``cell`` (int8, row-major (λ cell, u cell)): the count ``min{k: u < F(k; λ)}`` where it is the same all over
    the cell; where it is not, ``-2 - k_lo`` with ``k_lo`` its smallest value; -1 in the last row (λ >= 16).
    ``cdf`` (float64, (λ cell edge, k)): F(k; λ) at the cell edges. ``log_factorial``: log k!.
    """
    if not _TABLES:
        rate = torch.arange(_RATE_CELLS + 1, dtype=torch.float64) * (_TABLE_RATE / _RATE_CELLS)  # cell edges
        k = torch.arange(_K_MAX, dtype=torch.float64)
        log_factorial = torch.lgamma(k + 1)
        cdf = torch.exp(-rate[:, None] + k * torch.log(rate[:, None].clamp_min(1e-300)) - log_factorial).cumsum(1)
        cdf[0] = 1.0  # λ = 0
        u = torch.arange(2**_UNIFORM_BITS + 1, dtype=torch.float64) / 2**_UNIFORM_BITS
        quantile = torch.searchsorted(cdf, u.expand(_RATE_CELLS + 1, -1).contiguous(), right=True)
        # the quantile grows with λ and u: it is one value over a cell if the cell's extreme corners agree
        low, high = quantile[:-1, :-1], quantile[1:, 1:]
        cell = torch.where(low == high, low, -2 - low)
        cell = torch.cat([cell, torch.full((1, 2**_UNIFORM_BITS), -1, dtype=cell.dtype)])
        _TABLES.update(cell=cell.to(torch.int8).flatten(), cdf=cdf.flatten(), log_factorial=log_factorial)
    return _TABLES


def _poisson_ambiguous(rate: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``min{k: u < F(k; λ)}`` for λ < 16, from a lower bound ``k`` of it (float64 throughout).

    ``F(j; λ) = F(j; λ0) - ∫ pmf(j; t) dt`` over [λ0, λ], λ0 the lower edge of λ's cell, where the integrand is
    monotone: ``F(j; λ)`` lies between the tabulated ``F(j; λ0)`` minus (λ - λ0) times the larger or the smaller
    end value. Two such steps up from ``k`` decide almost all; the few others sum the probabilities.
    """
    tables = _poisson_tables()
    lam, u, k = rate.double(), u.double(), k.double()
    row = torch.floor(lam * (_RATE_CELLS / _TABLE_RATE))
    lam0 = row * (_TABLE_RATE / _RATE_CELLS)
    log_lam, log_lam0 = lam.clamp_min(1e-300).log(), lam0.clamp_min(1e-300).log()
    state = (k, lam, lam0, log_lam, log_lam0, row, u)
    todo = None  # the elements still counting up (None: all)
    unsure = []
    for _ in range(2):
        j, l, l0, ll, ll0, r, uu = state if todo is None else (t.index_select(0, todo) for t in state)
        log_f = tables["log_factorial"].index_select(0, j.long())
        p0, p1 = torch.exp(j * ll0 - l0 - log_f), torch.exp(j * ll - l - log_f)
        f0 = tables["cdf"].index_select(0, (r * _K_MAX + j).long())
        high = f0 - (l - l0) * torch.minimum(p0, p1) + 1e-12
        low = f0 - (l - l0) * torch.maximum(p0, p1) - 1e-12
        above = high <= uu  # F(j; λ) <= u for sure: the count is above j
        maybe, above = (~above & (low <= uu)).nonzero().flatten(), above.nonzero().flatten()
        unsure.append(maybe if todo is None else todo.index_select(0, maybe))
        todo = above if todo is None else todo.index_select(0, above)
        k.index_add_(0, todo, torch.ones_like(todo, dtype=k.dtype))
    todo = torch.cat([*unsure, todo])  # undecided, or still counting up
    if len(todo):
        i = torch.arange(_K_MAX, dtype=torch.float64)
        lt = lam.index_select(0, todo)[:, None]
        cdf = torch.exp(i * lt.clamp_min(1e-300).log() - lt - tables["log_factorial"]).cumsum(1)
        k.index_copy_(0, todo, (cdf <= u.index_select(0, todo)[:, None]).sum(1).double())
    return k


def _poisson(rate: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson counts with means ``rate`` (>= 0), float32, exact.

    ``torch.poisson`` on a GPU. On the CPU it draws element by element with a slow method below λ = 10, so there
    counts below λ = 16 are found by inversion, ``min{k: u < F(k; λ)}``, read from a table of (λ, u) cells where the
    cell decides ``k`` and bracketed from tabulated F where it does not (a few percent); ``torch.poisson`` (Hörmann's
    transformed rejection) draws the rest.
    """
    if rate.device.type != "cpu":
        return torch.poisson(rate, generator=generator)
    tables = _poisson_tables()
    flat = rate.reshape(-1).float()
    m = flat.numel()
    # the uniforms' top 10 bits pick the cell: three from each 31-bit random number
    third = -(-m // 3)
    bits = torch.empty(third, dtype=torch.int32).random_(generator=generator)
    top = torch.empty(3, third, dtype=torch.int32)
    torch.bitwise_right_shift(bits, 21, out=top[0])
    torch.bitwise_right_shift(bits, 11, out=top[1]).bitwise_and_(1023)
    torch.bitwise_right_shift(bits, 1, out=top[2]).bitwise_and_(1023)
    top = top.flatten()[:m]
    cell = (flat * (_RATE_CELLS / _TABLE_RATE)).clamp_(max=_RATE_CELLS).to(torch.int32).mul_(2**_UNIFORM_BITS)
    quantile = tables["cell"].index_select(0, cell.add_(top))
    out = quantile.to(torch.float32)
    rest = (quantile < 0).nonzero().flatten()
    if len(rest):
        code = quantile.index_select(0, rest)
        large = code == -1
        big, small = rest.index_select(0, large.nonzero().flatten()), (~large).nonzero().flatten()
        if len(big):
            out.index_copy_(0, big, torch.poisson(flat.index_select(0, big), generator=generator))
        if len(small):
            k_lo = (-2 - code.index_select(0, small)).double()
            small = rest.index_select(0, small)
            # the rest of the uniform: 14 more bits
            low = torch.empty(len(small), dtype=torch.int32).random_(generator=generator).bitwise_right_shift_(17)
            u = top.index_select(0, small).double().mul_(2.0**14).add_(low).mul_(2.0**-24)
            out.index_copy_(0, small, _poisson_ambiguous(flat.index_select(0, small), u, k_lo).float())
    return out.reshape(rate.shape)


def write_training_set(path: str | Path, stream: TrainingStream, n_samples: int, overwrite: bool = False) -> Path:
    """Write ``n_samples`` from ``stream`` to an HDF5 file (datasets ``inputs``, ``targets``, ``mask``).

    ``inputs`` has the stream's channels (3 for a probe-conditioned stream, whose per-sample masks follow from them
    with :func:`conditioning_mask`; ``mask`` is then the geometry's reference mask).

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
