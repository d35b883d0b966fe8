"""The paper's probe search: the overlap disagreement of a probe-conditioned network, minimised stochastically.

For a candidate probe θ (the 7 parameters), the network retrieves the phase patches φ_i of a set of scan positions
given θ; for every pair (i, j) of neighbouring positions, shifted by s_ij = (r_j − r_i) / pixel, the patches must
agree where both are illuminated, up to their unknown constant offsets:

    L(θ) = mean over pairs of  Σ_r w |d(r) − d̄| / Σ_r w,
    d(r) = φ_i(r) − φ_j(r − s_ij),   w(r) = mask_i(r) mask_j(r − s_ij)

(d̄ the w-weighted mean of d). With ``normalize=True`` (default) each pair's disagreement is divided by the spread of
its two patches over the overlap, so a probe for which the network returns flat patches cannot win. L is minimised
by the paper's stochastic search: ``n_trials`` random candidates around the current best per iteration, the search
radius shrinking geometrically from half the ranges to ``final_radius`` of them.

It needs a conditioned network that uses its probe input (docs/probe_recovery.md); ``recover_probe(...,
method="overlap")`` runs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .backend import torch_device
from .encoding import probe_channels, remove_mask_mean
from .probe import CARTESIAN_NAMES, AberrationRanges, ProbeGeometry, from_cartesian, to_cartesian
from .probe_epie import SEARCHABLE, check_search
from .runtime import PRECISIONS, prepared_network

#: A pair counts only where the bilinearly shifted mask of its partner is whole (all four neighbours inside).
_WHOLE = 0.999
#: Smallest overlap of a usable pair, as a fraction of the illuminated mask.
MIN_OVERLAP = 0.2
#: Default pair distance as a fraction of the illuminated mask's radius (the choice: docs/probe_recovery.md).
PAIR_DISTANCE = 0.5
#: The aberrations a search may vary (each with its angle).


# ---------------------------------------------------------------------------------------------- pairs
def neighbour_pairs(
    scan_shape: tuple[int, int], stride: int, n_pairs: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of scan positions ``stride`` steps apart along either scan axis, from a compact block of the scan.

    The block is the smallest m×m grid (stride apart, 2m(m−1) pairs) giving ``n_pairs`` pairs, placed at random
    (``rng``) or in the centre; if the scan is too small, every pair it has. Returns ``(indices, pairs)``: the raster
    indices of the positions used (M,) and the pairs (P, 2) as positions into ``indices``.
    """
    rx, ry = (int(n) for n in scan_shape)
    stride = max(1, int(stride))
    counts = [(rx - 1) // stride + 1, (ry - 1) // stride + 1]  # grid points along each axis
    m = 2
    while 2 * m * (m - 1) < n_pairs and (m < counts[0] or m < counts[1]):
        m += 1
    mx, my = min(m, counts[0]), min(m, counts[1])
    if mx * (my - 1) + my * (mx - 1) == 0:
        raise ValueError(
            f"the scan ({rx}×{ry} positions) has no pair of positions {stride} step(s) apart: probe recovery needs "
            "a 2-D scan (or at least a line) of overlapping positions"
        )
    span_x, span_y = (mx - 1) * stride, (my - 1) * stride
    if rng is None:
        x0, y0 = (rx - 1 - span_x) // 2, (ry - 1 - span_y) // 2
    else:
        x0, y0 = int(rng.integers(0, rx - span_x)), int(rng.integers(0, ry - span_y))
    gx, gy = np.meshgrid(x0 + stride * np.arange(mx), y0 + stride * np.arange(my), indexing="ij")
    indices = (gx * ry + gy).ravel()
    local = np.arange(mx * my).reshape(mx, my)
    along_x = np.stack([local[:-1].ravel(), local[1:].ravel()], 1)
    along_y = np.stack([local[:, :-1].ravel(), local[:, 1:].ravel()], 1)
    pairs = np.concatenate([along_x, along_y])
    if rng is not None:
        pairs = pairs[rng.permutation(len(pairs))]
    return indices, pairs[: max(1, int(n_pairs))]


# ---------------------------------------------------------------------------------------------- the loss
class OverlapLoss:
    """The overlap disagreement L(θ) of a fixed set of patterns and pairs, for batches of candidate probes.

    Parameters
    ----------
    model
        A probe-conditioned :class:`~py4dstem_deepcdi.models.DeepCDIModel`.
    amplitudes
        (M, N, N) network inputs of the positions used.
    positions
        (M, 2) their positions (Å).
    pairs
        (P, 2) index pairs into ``amplitudes``.
    normalize
        Divide each pair's disagreement by the spread of its patches over the overlap.
    precision, device, batch_size
        Network arithmetic, device and patterns per forward pass.
    """

    def __init__(
        self,
        model,
        amplitudes: np.ndarray,
        positions: np.ndarray,
        pairs: np.ndarray,
        normalize: bool = True,
        precision: str = "bf16",
        device: str = "cpu",
        batch_size: int = 2048,
    ):
        model.require_conditioned("probe recovery")
        self.model = model
        self.device = torch_device(device)
        self.net = prepared_network(model, precision, self.device)
        self.amplitudes = torch.as_tensor(np.asarray(amplitudes, dtype=np.float32), device=self.device)
        self.pairs = torch.as_tensor(np.asarray(pairs), device=self.device).long()
        self.normalize = bool(normalize)
        self.batch_size = int(batch_size)
        n0, n1 = model.geometry.detector_shape
        positions = np.asarray(positions)
        shifts = (positions[pairs[:, 1]] - positions[pairs[:, 0]]) / np.asarray(model.geometry.sampling)
        # grid_sample coordinates (align_corners=True: −1 and 1 are the first and last pixel centres) of r − s_ij
        r0, r1 = np.meshgrid(np.arange(n0), np.arange(n1), indexing="ij")
        rows = (r0[None] - shifts[:, 0, None, None]) * 2 / (n0 - 1) - 1
        cols = (r1[None] - shifts[:, 1, None, None]) * 2 / (n1 - 1) - 1
        self.grid = torch.as_tensor(np.stack([cols, rows], -1), dtype=torch.float32, device=self.device)  # (P, N, N, 2)

    def geometries(self, vectors: np.ndarray) -> list[ProbeGeometry]:
        """The model's geometry with each candidate's aberrations (Cartesian vectors (T, 7), Å)."""
        return [self.model.geometry.replace(aberrations=from_cartesian(v)) for v in np.atleast_2d(vectors)]

    @torch.inference_mode()
    def patches(self, geometries: Sequence[ProbeGeometry]) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-mean masked patches (T, M, N, N) and masks (T, N, N) for each candidate probe."""
        t, (m, n0, n1) = len(geometries), self.amplitudes.shape
        channels = probe_channels(np.stack([g.probe for g in geometries])).to(self.device)  # (T, 2, N, N)
        masks = torch.as_tensor(np.stack([g.mask for g in geometries]), dtype=torch.float32, device=self.device)
        out = torch.empty(t, m, n0, n1, device=self.device)
        flat_out = out.view(t * m, n0, n1)
        total = t * m
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            k = torch.arange(start, stop, device=self.device)
            x = torch.cat([self.amplitudes[k % m, None], channels[k // m]], 1)
            flat_out[start:stop] = self.net(x)[:, 0]
        return remove_mask_mean(out, masks[:, None]), masks

    @torch.inference_mode()
    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """Loss of each candidate (Cartesian vectors (T, 7), Å): (T,) numpy."""
        geometries = self.geometries(vectors)
        patches, masks = self.patches(geometries)
        t, p = len(geometries), len(self.pairs)
        first = patches[:, self.pairs[:, 0]]  # (T, P, N, N)
        second = patches[:, self.pairs[:, 1]]
        grid = self.grid.repeat(t, 1, 1, 1)
        n0, n1 = first.shape[-2:]
        moved = F.grid_sample(second.reshape(t * p, 1, n0, n1), grid, mode="bilinear", align_corners=True)
        moved_mask = F.grid_sample(
            masks[:, None].expand(t, p, n0, n1).reshape(t * p, 1, n0, n1), grid, mode="bilinear", align_corners=True
        )
        w = (moved_mask.view(t, p, n0, n1) > _WHOLE) * masks[:, None]
        area = w.sum((-2, -1)).clamp_min(1)
        d = first - moved.view(t, p, n0, n1)
        d = d - (d * w).sum((-2, -1), keepdim=True) / area[..., None, None]
        loss = (d.abs() * w).sum((-2, -1)) / area  # (T, P)
        if self.normalize:
            spread = torch.zeros_like(loss)
            for values in (first, moved.view(t, p, n0, n1)):
                centred = values - (values * w).sum((-2, -1), keepdim=True) / area[..., None, None]
                spread += (centred.abs() * w).sum((-2, -1)) / area
            loss = loss / spread.clamp_min(1e-6)
        # a pair whose overlap is below MIN_OVERLAP of the mask tells nothing: it gets the worst loss of its
        # candidate (1, the level of unrelated patches, when normalised), so a probe cannot win by not overlapping
        usable = w.sum((-2, -1)) >= MIN_OVERLAP * masks.sum((-2, -1))[:, None]
        worst = torch.where(usable, loss, torch.zeros_like(loss)).amax(1, keepdim=True)
        penalty = torch.ones_like(worst) if self.normalize else torch.where(worst > 0, worst, torch.ones_like(worst))
        return torch.where(usable, loss, penalty).mean(1).cpu().numpy()


# ---------------------------------------------------------------------------------------------- the search
@dataclass(frozen=True)
class RecoveryOptions:
    """Settings of the overlap search (``recover_probe(..., method="overlap")``, its keywords of the same names).

    Raises
    ------
    ValueError
        If a count is below 1, ``search`` names something other than C10, C12, C21, C23, ``final_radius`` is
        outside (0, 1], ``pair_distance`` is not a positive distance or ``precision`` is unknown.
    """

    n_pairs: int = field(default=100, metadata={"help": "pairs of neighbouring positions compared", "flag": "--pairs"})
    n_iterations: int = field(default=50, metadata={"help": "search iterations", "flag": "--iterations"})
    n_trials: int = field(default=30, metadata={"help": "random candidates per iteration", "flag": "--trials"})
    ranges: AberrationRanges | None = field(
        default=None, metadata={"help": "search ranges (default the model's training ranges; must lie inside them)"}
    )
    search: tuple[str, ...] = field(
        default=SEARCHABLE,
        metadata={"help": "aberrations searched, of C10, C12, C21, C23 (each with its angle); the others stay fixed"},
    )
    pair_distance: float | None = field(
        default=None,
        metadata={"help": "distance of paired positions (Å); default PAIR_DISTANCE × the initial mask's radius"},
    )
    final_radius: float = field(
        default=0.02, metadata={"help": "search radius at the last iteration, as a fraction of the first (half ranges)"}
    )
    normalize: bool = field(
        default=True, metadata={"help": "divide each pair's disagreement by the spread of its patches over the overlap"}
    )
    random_block: bool = field(
        default=False, metadata={"help": "take the block of positions at a random place of the scan (default: centre)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random initial probe, the block and the candidates"})
    precision: str = field(default="bf16", metadata={"help": "network arithmetic: bf16 or fp32"})

    def __post_init__(self):
        for name in ("n_pairs", "n_iterations", "n_trials", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "search", check_search(self.search))
        for name in ("n_pairs", "n_iterations", "n_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.final_radius <= 1:
            raise ValueError(f"final_radius must lie in (0, 1], got {self.final_radius}")
        if self.pair_distance is not None:
            _check_pair_distance(self.pair_distance)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def _check_pair_distance(distance: float) -> None:
    if not (math.isfinite(distance) and distance > 0):
        raise ValueError(f"pair_distance must be a positive distance in Å, got {distance}")


@dataclass
class OverlapSearch:
    """What the stochastic search went through.

    Attributes
    ----------
    best
        The best Cartesian vector (7,) (Å); ``best_loss`` and ``initial_loss`` its loss and the start's.
    history
        Best loss after each iteration (n_iterations,).
    trials
        Loss of every candidate (n_iterations, n_trials).
    path
        Best vector after each iteration (n_iterations, 7) (Å).
    pairs
        (P, 2) raster indices of the paired positions; ``positions`` (M, 2) the positions used (Å).
    distance, stride
        Pair distance (Å) and stride (scan steps).
    time_s
        Wall time (s); ``evaluations`` the candidates evaluated.
    """

    best: np.ndarray
    best_loss: float
    initial_loss: float
    history: np.ndarray
    trials: np.ndarray
    path: np.ndarray
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=int))
    positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    distance: float = 0.0
    stride: int = 0
    time_s: float = 0.0
    evaluations: int = 0


def overlap_search(
    model, data, start: np.ndarray, ranges: AberrationRanges, options: RecoveryOptions, rng: np.random.Generator,
    device: str, progress: bool,
) -> OverlapSearch:
    """The stochastic search of the overlap loss from the Cartesian ``start`` (7,) on the preprocessed ``data``
    (``PreprocessedData`` of a reconstruction with the conditioned ``model``); ``rng`` draws the block (if random)
    and the candidates."""
    initial_geometry = model.geometry.replace(aberrations=from_cartesian(start))
    loss, indices, pairs, distance, stride = _overlap_loss(model, data, initial_geometry, options, rng, device)
    found = _stochastic_search(loss, start, ranges, options, rng, progress)
    found.pairs, found.positions = indices[pairs], data.positions[indices]
    found.distance, found.stride = float(distance), int(stride)
    found.evaluations = 1 + options.n_iterations * options.n_trials
    return found


def _overlap_loss(
    model, data, initial_geometry: ProbeGeometry, options: RecoveryOptions, rng: np.random.Generator, device: str
) -> tuple[OverlapLoss, np.ndarray, np.ndarray, float, int]:
    """The loss over a block of positions of the preprocessed ``data``: (loss, raster indices of the positions,
    pairs into them, pair distance (Å), pair stride (scan steps))."""
    distance = options.pair_distance
    if distance is None:
        distance = PAIR_DISTANCE * math.sqrt(initial_geometry.mask_area / math.pi)
        _check_pair_distance(distance)
    stride = max(1, round(distance / min(data.scan_step)))
    indices, pairs = neighbour_pairs(data.scan_shape, stride, options.n_pairs, rng if options.random_block else None)
    loss = OverlapLoss(
        model, data.amplitudes[indices], data.positions[indices], pairs, options.normalize, options.precision, device
    )
    return loss, indices, pairs, distance, stride




def search_ranges(ranges: AberrationRanges | None, trained: AberrationRanges | None) -> AberrationRanges:
    """The search ranges: ``ranges`` (checked to lie inside the training ranges ``trained``) or ``trained``."""
    ranges = ranges or trained
    if trained is not None and ranges is not trained:
        lo, hi = ranges.bounds()
        tlo, thi = trained.bounds()
        if np.any(lo < tlo - 1e-9) or np.any(hi > thi + 1e-9):
            raise ValueError(
                f"search ranges {ranges.to_dict()} leave the model's training ranges {trained.to_dict()} (Å)"
            )
    return ranges


def start_vector(
    initial: Mapping[str, float] | None, ranges: AberrationRanges, rng: np.random.Generator
) -> np.ndarray:
    """The Cartesian starting vector (7,) (Å): ``initial``, checked to lie in the ranges, or a random one."""
    if initial is None:
        return ranges.sample(1, rng)[0]
    start = to_cartesian(initial)
    problems = ranges.contains(from_cartesian(start))
    if problems:
        raise ValueError(f"the initial probe lies outside the search ranges: {'; '.join(problems)}")
    return start


def _stochastic_search(
    loss: OverlapLoss,
    start: np.ndarray,
    ranges: AberrationRanges,
    options: RecoveryOptions,
    rng: np.random.Generator,
    progress: bool,
) -> OverlapSearch:
    """The paper's stochastic search from ``start``: ``n_trials`` Gaussian candidates around the best per iteration,
    clipped to the ranges, the radius shrinking geometrically from half the ranges to ``final_radius`` of them."""
    active = np.zeros(7, dtype=bool)
    for name in options.search:
        active[[i for i, c in enumerate(CARTESIAN_NAMES) if c.startswith(name)]] = True
    lo, hi = ranges.bounds()
    radius0 = np.where(active, (hi - lo) / 2, 0.0)
    t0 = time.perf_counter()
    best = start.copy()
    best_loss = initial_loss = float(loss(best[None])[0])
    history, trials, path = [], [], []
    n = options.n_iterations
    bar = tqdm(range(n), desc="probe search", disable=not progress)
    for it in bar:
        radius = radius0 * options.final_radius ** (it / max(n - 1, 1))
        candidates = ranges.clip(best + radius * rng.standard_normal((options.n_trials, 7)))
        losses = loss(candidates)
        k = int(np.argmin(losses))
        if losses[k] < best_loss:
            best, best_loss = candidates[k], float(losses[k])
        history.append(best_loss)
        trials.append(losses)
        path.append(best.copy())
        bar.set_postfix(loss=f"{best_loss:.4g}", C10=f"{best[0]:.1f}")
    bar.close()
    return OverlapSearch(best, best_loss, initial_loss, np.asarray(history), np.asarray(trials), np.asarray(path),
                         time_s=time.perf_counter() - t0)

