"""Probe aberrations from the data by py4DSTEM's ptychography: the probe that ePIE explains the patterns best with.

For a candidate probe θ (Cartesian aberrations, :data:`~py4dstem_deepcdi.probe.CARTESIAN_NAMES`), py4DSTEM's
``SingleslicePtychography`` reconstructs the object of a block of the scan with the probe held fixed at θ
(``reconstruction_method="GD"``, ``epie_iterations`` passes over the block in batches of ``batch`` patterns); the
loss E(θ) is py4DSTEM's normalised data error after the last pass. A wrong defocus or astigmatism leaves a data
error that the object cannot absorb, so E has its minimum at the true probe; it is smooth and close to quadratic
over tens of Å.

The search is coordinate-wise Newton on parabolas: in each round, for every searched coordinate j, E is evaluated at
θ ± h s_j e_j (h the round's radius in Å of C10, s_j = 1 for C10 and C12 and (3/2)/α_max for C21 and C23, the same
phase at the aperture edge α_max); every coordinate moves to the vertex of its parabola (at most 2 h s_j; a round
whose step reached that limit is repeated, up to :data:`MAX_REPEATS` times); the rounds shrink h (``radii``).

The search runs on a central block of the scan (large: the data error of a small block is biased towards larger
probes, whose extra illuminated border the object can fit freely). The error estimate of each coordinate comes from
the K sub-blocks of that block: the vertices of their own parabolas in the last round, their standard deviation / √K.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import py4DSTEM
from tqdm.auto import tqdm

from .probe import CARTESIAN_NAMES, AberrationRanges, ProbeGeometry, from_cartesian, to_cartesian
from .scan import calibrated_datacube

#: The aberrations a search may vary (each with its angle), and the Cartesian coordinates of each.
SEARCHABLE = ("C10", "C12", "C21", "C23")
_COORDINATES = {"C10": (0,), "C12": (1, 2), "C21": (3, 4), "C23": (5, 6)}
#: Smallest block side (positions) that a search accepts, and the smallest side of a sub-block of the error estimate.
MIN_BLOCK = 6
MIN_SUB_BLOCK = 5
#: Rounds a search may add, repeating a round whose step reached its limit (2 steps).
MAX_REPEATS = 3
#: FFT-friendly detector sizes (2^a 3^b 5^c) a pattern may be cropped to.
_NICE = sorted({2**a * 3**b * 5**c for a in range(1, 10) for b in range(4) for c in range(3)})


@dataclass(frozen=True)
class EPIESearchOptions:
    """Settings of the ePIE data-error search (``recover_probe(..., method="epie")``, its keywords of the same names).

    Raises
    ------
    ValueError
        For ``block`` < :data:`MIN_BLOCK`, ``n_blocks``, ``epie_iterations`` or ``batch`` < 1, radii that are not
        positive and decreasing, ``tolerance`` <= 0, or ``search`` naming something other than C10, C12, C21, C23.
    """

    block: int = field(default=40, metadata={"help": "scan positions per side of the central block searched on"})
    n_blocks: int = field(
        default=4,
        metadata={"help": "sub-blocks of that block whose spread gives the error estimate (1: none; fewer if small)"},
    )
    epie_iterations: int = field(default=5, metadata={"help": "ePIE passes over a block per candidate probe"})
    batch: int = field(default=16, metadata={"help": "patterns per ePIE update", "flag": "--epie-batch"})
    radii: tuple[float, float] = field(
        default=(20.0, 5.0),
        metadata={"help": "step of each search round (Å of C10; C21/C23 scaled to the same edge phase)",
                  "metavar": ("R1", "R2")},
    )
    search: tuple[str, ...] = ("C10", "C12")
    tolerance: float = field(
        default=3.0, metadata={"help": "error estimate (Å) above which a recovered aberration is flagged"}
    )
    detector_angle: float | None = field(
        default=1.3,
        metadata={"help": "crop the patterns to ± this many semi-angles (FFT-friendly size; None: the whole detector)",
                  "metavar": "RATIO"},
    )

    def __post_init__(self):
        for name in ("block", "n_blocks", "epie_iterations", "batch"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "radii", tuple(float(r) for r in self.radii))
        object.__setattr__(self, "search", check_search(self.search))
        if self.block < MIN_BLOCK:
            raise ValueError(f"block must be >= {MIN_BLOCK} positions per side, got {self.block}")
        for name in ("n_blocks", "epie_iterations", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        radii = np.asarray(self.radii)
        if not (len(radii) and np.all(np.isfinite(radii)) and np.all(radii > 0) and np.all(np.diff(radii) <= 0)):
            raise ValueError(f"radii must be positive and non-increasing (Å), got {self.radii}")
        if self.detector_angle is not None and not (math.isfinite(self.detector_angle) and self.detector_angle >= 1):
            raise ValueError(f"detector_angle must be >= 1 semi-angle (the bright disk), got {self.detector_angle}")
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"tolerance must be a positive number of Å, got {self.tolerance}")


def check_search(search: Sequence[str]) -> tuple[str, ...]:
    """``search`` as a tuple, refused (ValueError) unless it names some of C10, C12, C21, C23."""
    search = tuple(search)
    if not search or any(name not in SEARCHABLE for name in search):
        raise ValueError(f"search names aberrations among C10, C12, C21, C23 (angles come with them), got {search}")
    return search


@dataclass(frozen=True)
class ScanData:
    """The raw scan an ePIE search runs on: patterns (Rx, Ry, Qx, Qy) counts, scan step (Å), detector pixel (mrad),
    scan rotation (deg) and transpose (py4DSTEM's convention), energy (eV), semi-angle (mrad), aperture roll-off
    (mrad) and the measured vacuum pattern (Qx, Qy) or None."""

    patterns: np.ndarray
    step: float
    angular: float
    rotation_deg: float
    transpose: bool
    energy: float
    semiangle: float
    rolloff: float = 2.0
    vacuum: np.ndarray | None = None

    def geometry(self, aberrations: Mapping[str, float]) -> ProbeGeometry:
        """The data's probe geometry (its detector, aperture) with ``aberrations``; raises ValueError when that probe
        does not fit the detector's real-space window."""
        return ProbeGeometry(
            self.energy, self.semiangle, detector_shape=self.patterns.shape[2:], angular_sampling=self.angular,
            aberrations=aberrations, rolloff=self.rolloff, vacuum_probe_intensity=self.vacuum,
        )  # fmt: skip


@dataclass
class EPIESearch:
    """Record of one ePIE data-error search.

    Attributes
    ----------
    best
        The recovered Cartesian vector (7,) (Å); ``start`` the initial one.
    sigma
        Error estimate of each Cartesian coordinate (7,) (Å; 0 for those not searched, NaN if undetermined).
    block_estimates
        (K, 7) each block's own estimate in the last round (Cartesian, Å).
    vectors, losses
        Every candidate evaluated on the main block (E, 7) and its loss (E,) (py4DSTEM's normalised error).
    loss, initial_loss
        Loss of ``best`` and of ``start``.
    main_block, blocks
        The central block (4,) and the sub-blocks of the error estimate (K, 4) as (row0, row1, col0, col1) scan
        indices.
    curvature
        Curvature of the loss along each coordinate in the last round (per Å², 0 if not searched).
    settled
        False when the last round still moved a coordinate by its limit: the minimum was not reached.
    time_s
        Wall time (s).
    """

    best: np.ndarray
    start: np.ndarray
    sigma: np.ndarray
    block_estimates: np.ndarray
    vectors: np.ndarray
    losses: np.ndarray
    loss: float
    initial_loss: float
    main_block: np.ndarray
    blocks: np.ndarray
    curvature: np.ndarray
    settled: bool
    time_s: float


# ---------------------------------------------------------------------------------------------- blocks and data
def scan_blocks(scan_shape: tuple[int, int], block: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The central ``block``×``block`` positions of the scan (all of it along a shorter axis) and its split into a
    g×g grid of sub-blocks (g = ⌈√n_blocks⌉, fewer where a sub-block would have fewer than :data:`MIN_SUB_BLOCK`
    positions per side; the first ``n_blocks`` of them; none for g = 1), each as (row0, row1, col0, col1) scan
    indices: ``(main (4,), sub-blocks (K, 4))``.

    Raises ValueError when the scan has fewer than :data:`MIN_BLOCK` positions along an axis.
    """
    rx, ry = (int(n) for n in scan_shape)
    if min(rx, ry) < MIN_BLOCK:
        raise ValueError(
            f"the scan has {rx}×{ry} positions: too few for probe recovery, which needs a block of at least "
            f"{MIN_BLOCK}×{MIN_BLOCK} overlapping positions"
        )
    bx, by = min(block, rx), min(block, ry)
    x0, y0 = (rx - bx) // 2, (ry - by) // 2
    g = math.ceil(math.sqrt(n_blocks))
    while g > 1 and min(bx, by) // g < MIN_SUB_BLOCK:
        g -= 1
    ex, ey = np.linspace(0, bx, g + 1).round().astype(int), np.linspace(0, by, g + 1).round().astype(int)
    subs = [[x0 + ex[i], x0 + ex[i + 1], y0 + ey[j], y0 + ey[j + 1]] for i in range(g) for j in range(g)]
    return np.array([x0, x0 + bx, y0, y0 + by]), np.array(subs[:n_blocks] if g > 1 else [], dtype=int).reshape(-1, 4)


def nice_size(n: int, wanted: float) -> int:
    """The smallest FFT-friendly size (2^a 3^b 5^c, even) of at least ``wanted`` pixels, at most ``n`` (else the
    largest such size not above ``n``)."""
    fitting = [s for s in _NICE if s <= n]
    return min([s for s in fitting if s >= wanted] or [max(fitting)])


def cropped(data: ScanData, ratio: float | None) -> ScanData:
    """``data`` with its patterns (and vacuum) cropped about the pattern centre N//2 to FFT-friendly sizes covering
    ± ``ratio`` semi-angles (None: the whole detector, still cropped to an FFT-friendly size)."""
    n0, n1 = data.patterns.shape[2:]
    wanted = (n0, n1) if ratio is None else (2 * ratio * data.semiangle / data.angular,) * 2
    m0, m1 = nice_size(n0, wanted[0]), nice_size(n1, wanted[1])
    if (m0, m1) == (n0, n1):
        return data
    a0, a1 = n0 // 2 - m0 // 2, n1 // 2 - m1 // 2
    vacuum = None if data.vacuum is None else data.vacuum[a0 : a0 + m0, a1 : a1 + m1]
    patterns = data.patterns[:, :, a0 : a0 + m0, a1 : a1 + m1]
    return ScanData(patterns, data.step, data.angular, data.rotation_deg, data.transpose, data.energy,
                    data.semiangle, data.rolloff, vacuum)


def check_overlap(data: ScanData, geometry: ProbeGeometry) -> None:
    """Refuse (ValueError) a scan whose step is as large as the probe: neighbouring positions do not overlap."""
    diameter = 2 * geometry.support_radius()
    if data.step >= diameter:
        raise ValueError(
            f"no overlap: the scan step {data.step:.3g} Å is not smaller than the probe ({diameter:.3g} Å across, "
            "90% of its intensity); probe recovery needs overlapping positions (a finer scan or a larger defocus)"
        )


def edge_scale(data: ScanData) -> np.ndarray:
    """Step scale s_j of each Cartesian coordinate (7,): 1 for C10, C12 and 3/(2 α_max) for C21, C23, so that one
    step changes the phase at the aperture edge α_max (rad) by the same amount."""
    alpha = data.semiangle * 1e-3
    return np.array([1, 1, 1, 1.5 / alpha, 1.5 / alpha, 1.5 / alpha, 1.5 / alpha])


def edge_phase_per_angstrom(name: str, data: ScanData) -> float:
    """Phase (rad) that 1 Å of aberration ``name`` (C10, C12, C21, C23) adds at the aperture edge."""
    alpha, wavelength = data.semiangle * 1e-3, data.geometry({}).wavelength
    power = 2 if name in ("C10", "C12") else 3
    return 2 * math.pi / wavelength * alpha**power / power


def estimate_scan_rotation(data: ScanData, block: int = 32) -> tuple[float, bool]:
    """Scan rotation (deg) and transpose estimated by py4DSTEM's centre-of-mass method on the central ``block``×
    ``block`` positions (``data.rotation_deg`` and ``data.transpose`` are ignored)."""
    rx, ry = data.patterns.shape[:2]
    bx, by = min(block, rx), min(block, ry)
    x0, y0 = (rx - bx) // 2, (ry - by) // 2
    patterns = np.array(data.patterns[x0 : x0 + bx, y0 : y0 + by], dtype=np.float32)
    ptycho = py4DSTEM.process.phase.SingleslicePtychography(
        energy=data.energy, datacube=calibrated_datacube(patterns, data.step, data.angular),
        semiangle_cutoff=data.semiangle, rolloff=data.rolloff, vacuum_probe_intensity=data.vacuum, verbose=False,
    )  # fmt: skip
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        ptycho.preprocess(plot_center_of_mass=False, plot_rotation=False, plot_probe_overlaps=False)
    # private attributes: py4DSTEM 0.14 exposes them only through a file written by save
    return float(np.rad2deg(ptycho._rotation_best_rad)), bool(ptycho._rotation_best_transpose)


# ---------------------------------------------------------------------------------------------- the loss
class EPIELoss:
    """Per-block data error of py4DSTEM's ePIE with the probe held fixed at a candidate (Cartesian vector, Å).

    Parameters
    ----------
    data
        The scan (:class:`ScanData`).
    blocks
        (K, 4) blocks from :func:`scan_blocks`.
    iterations, batch
        ePIE passes per candidate and patterns per update.
    """

    def __init__(self, data: ScanData, blocks: np.ndarray, iterations: int, batch: int):
        self.data = data
        self.blocks = blocks
        self.iterations = int(iterations)
        self.batch = int(batch)
        self.datacubes = [
            calibrated_datacube(np.array(data.patterns[r0:r1, c0:c1], dtype=np.float32), data.step, data.angular)
            for r0, r1, c0, c1 in blocks
        ]
        self.evaluations = 0

    def block_error(self, datacube, aberrations: dict[str, float]) -> float:
        """py4DSTEM's normalised error after the last pass over one block with the probe fixed at ``aberrations``."""
        d = self.data
        ptycho = py4DSTEM.process.phase.SingleslicePtychography(
            energy=d.energy, datacube=datacube, semiangle_cutoff=d.semiangle, rolloff=d.rolloff,
            vacuum_probe_intensity=d.vacuum, polar_parameters=dict(aberrations), object_type="complex",
            verbose=False,
        )  # fmt: skip
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            ptycho.preprocess(
                plot_center_of_mass=False, plot_rotation=False, plot_probe_overlaps=False,
                force_com_rotation=float(d.rotation_deg), force_com_transpose=bool(d.transpose),
            )  # fmt: skip
            ptycho.reconstruct(
                num_iter=self.iterations, reconstruction_method="GD", max_batch_size=self.batch, fix_probe=True,
                seed_random=0, progress_bar=False, reset=True,
            )  # fmt: skip
        error = float(ptycho.error_iterations[-1])
        if not math.isfinite(error):
            raise RuntimeError(f"py4DSTEM's ePIE returned a non-finite error for the probe {aberrations}")
        return error

    def __call__(self, vector: np.ndarray) -> np.ndarray:
        """Per-block losses (K,) of the candidate ``vector`` (7,) (Cartesian, Å)."""
        self.evaluations += 1
        aberrations = from_cartesian(vector)
        return np.array([self.block_error(dc, aberrations) for dc in self.datacubes])


# ---------------------------------------------------------------------------------------------- the search
def _vertex(e0: float, plus: float, minus: float, h: float) -> float:
    """Offset of the vertex of the parabola through (−h, minus), (0, e0), (h, plus), clipped to ±2h; NaN when the
    parabola opens downwards (no minimum)."""
    curvature = plus - 2 * e0 + minus
    if curvature <= 0:
        return math.nan
    return float(np.clip(-h * (plus - minus) / (2 * curvature), -2 * h, 2 * h))


def _block_vertex(e0: float, plus: float, minus: float, h: float) -> float:
    """:func:`_vertex` for a sub-block's estimate: NaN (undetermined) also when it reaches the ±2h limit."""
    d = _vertex(e0, plus, minus, h)
    return d if abs(d) < 2 * h else math.nan


class _Evaluations:
    """Every candidate evaluated on the main block: vectors, summed losses; a progress bar."""

    def __init__(self, loss: EPIELoss, total: int, progress: bool):
        self.loss, self.vectors, self.losses = loss, [], []
        self.bar = tqdm(total=total, desc="ePIE probe search", disable=not progress)

    def __call__(self, vector: np.ndarray) -> float:
        value = float(self.loss(vector).sum())
        self.vectors.append(vector.copy())
        self.losses.append(value)
        self.bar.update()
        return value

    def best(self) -> tuple[np.ndarray, float]:
        k = int(np.argmin(self.losses))
        return self.vectors[k].copy(), self.losses[k]


def search_aberrations(
    data: ScanData,
    start: Mapping[str, float],
    options: EPIESearchOptions,
    ranges: AberrationRanges | None = None,
    progress: bool = False,
) -> EPIESearch:
    """Minimise the ePIE data error of the central block over the searched aberrations, from ``start``; the error
    estimate from the sub-blocks' own parabolas in the last round.

    ``ranges`` (if given) bound the candidates. Returns the :class:`EPIESearch` record. Raises ValueError for a scan
    too small for the blocks, and RuntimeError when py4DSTEM returns a non-finite error.
    """
    t0 = time.perf_counter()
    data = cropped(data, options.detector_angle)
    main, subs = scan_blocks(data.patterns.shape[:2], options.block, options.n_blocks)
    sub_loss = EPIELoss(data, subs, options.epie_iterations, options.batch) if len(subs) else None
    active = [i for name in options.search for i in _COORDINATES[name]]
    scale = edge_scale(data)
    clip = ranges.clip if ranges is not None else (lambda v: v)
    evaluate = _Evaluations(EPIELoss(data, main[None], options.epie_iterations, options.batch),
                            1 + len(options.radii) * (2 * len(active) + 1), progress)
    centre = clip(to_cartesian(start))
    e_centre = initial_loss = evaluate(centre)
    estimates = np.tile(centre, (max(len(subs), 1), 1))
    sigma, curvature, repeats = np.zeros(7), np.zeros(7), 0
    rounds = list(options.radii)
    while rounds:
        h = rounds.pop(0)
        last = not rounds
        step_to, clipped = np.zeros(7), False
        sub_centre = sub_loss(centre) if last and sub_loss else None
        for j in active:
            s = h * scale[j]
            offset = np.zeros(7)
            offset[j] = s
            plus, minus = clip(centre + offset), clip(centre - offset)
            e_plus, e_minus = evaluate(plus), evaluate(minus)
            d = _vertex(e_centre, e_plus, e_minus, s)
            step_to[j] = d if math.isfinite(d) else (2 * s if e_plus < e_minus else -2 * s)
            clipped |= abs(step_to[j]) >= 2 * s
            curvature[j] = (e_plus - 2 * e_centre + e_minus) / s**2
            if sub_centre is not None:
                sp, sm = sub_loss(plus), sub_loss(minus)
                estimates[:, j] = centre[j] + [_block_vertex(c, p, m, s) for c, p, m in zip(sub_centre, sp, sm)]
        candidate = clip(centre + step_to)
        e_candidate = evaluate(candidate)
        centre, e_centre = (candidate, e_candidate) if e_candidate <= e_centre else evaluate.best()
        if clipped and repeats < MAX_REPEATS:  # the minimum lies beyond this round's reach: once more at this step
            repeats += 1
            rounds.insert(0, h)
        settled = not clipped
    evaluate.bar.close()
    for j in active:  # the standard error of the sub-blocks' estimates (those with a minimum within reach)
        finite = estimates[np.isfinite(estimates[:, j]), j]
        sigma[j] = np.std(finite, ddof=1) / math.sqrt(len(finite)) if len(finite) > 1 else math.nan
    return EPIESearch(
        best=centre, start=to_cartesian(start), sigma=sigma, block_estimates=estimates,
        vectors=np.array(evaluate.vectors), losses=np.array(evaluate.losses), loss=e_centre, initial_loss=initial_loss,
        main_block=main, blocks=subs, curvature=curvature, settled=settled, time_s=time.perf_counter() - t0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- reporting
def polar_uncertainty(vector: np.ndarray, sigma: np.ndarray) -> dict[str, float]:
    """Error estimates of the polar parameters (Å, rad) from a Cartesian vector (7,) and its errors (7,):
    σ_C = √((a σ_a)² + (b σ_b)²)/C and σ_φ = √((b σ_a)² + (a σ_b)²)/(n C²) (π/n for C = 0)."""
    out = {"C10": float(sigma[0])}
    for i, (name, n) in enumerate((("C12", 2), ("C21", 1), ("C23", 3))):
        a, b = vector[1 + 2 * i : 3 + 2 * i]
        sa, sb = sigma[1 + 2 * i : 3 + 2 * i]
        c = math.hypot(a, b)
        if c > 0:
            out[name] = math.hypot(a * sa, b * sb) / c
            out["phi" + name[1:]] = math.hypot(b * sa, a * sb) / (n * c * c)
        else:
            out[name] = math.hypot(sa, sb)
            out["phi" + name[1:]] = math.pi / n if (sa or sb) else 0.0
    return out


def conditioning_warnings(found: EPIESearch, data: ScanData, options: EPIESearchOptions) -> list[str]:
    """Messages for each searched aberration whose error estimate exceeds ``options.tolerance`` (or is undetermined:
    a flat or concave loss, or a single block), with the phase 1 Å of it adds at the aperture edge; and one when the
    search did not settle."""
    messages = []
    if not found.settled:
        messages.append(
            "the probe search did not settle (its last step still reached its limit, "
            f"{np.abs(found.best - found.start).max():.0f} Å from the start): the data error kept falling, which "
            "happens when the aperture model does not match the data; give the measured vacuum pattern "
            "(vacuum_probe_intensity) or the right rolloff (0 for a sharp aperture), or start closer"
        )
    for name in options.search:
        idx = list(_COORDINATES[name])
        sigma = float(np.sqrt(np.sum(found.sigma[idx] ** 2) / len(idx)))
        flat = bool(np.any(found.curvature[idx] <= 0))
        if flat or not math.isfinite(sigma) or sigma > options.tolerance:
            if flat:
                what = "the data error is flat or concave along it"
            elif math.isfinite(sigma):
                what = f"error estimate ±{sigma:.3g} Å"
            else:
                what = "no error estimate: fewer than two sub-blocks with a minimum within reach"
            messages.append(
                f"{name} is ill-conditioned here ({what}, tolerance {options.tolerance:g} Å): at a semi-angle of "
                f"{data.semiangle:g} mrad, 1 Å of {name} adds only {edge_phase_per_angstrom(name, data):.2g} rad at "
                "the aperture edge; treat the recovered value as unknown"
            )
    return messages


def cartesian_names(search: Sequence[str]) -> tuple[str, ...]:
    """The Cartesian coordinates (:data:`CARTESIAN_NAMES`) of the searched aberrations."""
    return tuple(CARTESIAN_NAMES[i] for name in search for i in _COORDINATES[name])
