"""Probe recovery: the probe's aberrations from the data alone, with an error estimate for each.

Two methods behind :func:`recover_probe`:

- ``method="epie"`` (default, :mod:`.probe_epie`): the probe with which py4DSTEM's ePIE explains a central block of
  the scan best (the smallest data error with the probe held fixed), found by parabola steps along each searched
  aberration; the error estimate is the spread of the same parabolas over sub-blocks. No network is needed.
- ``method="overlap"`` (:mod:`.probe_overlap`): the paper's stochastic search on the overlap disagreement of a
  probe-conditioned network's patches; it needs a conditioned network that uses its probe input.

The result, a :class:`ProbeRecovery`, says which aberrations came from the data (``from_data``) and which were kept
at their initial values, and feeds a reconstruction directly: ``DeepCDIReconstruction(..., probe=result)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from py4DSTEM.process.phase.utils import aberrations_basis_function, fit_aberration_surface
from py4DSTEM.process.utils import electron_wavelength_angstrom

from .comparison.inputs import is_reconstruction, reconstruction_vacuum, scan_patterns
from .io import save_figure
from .models import as_model
from .preprocessing import datacube_array, detector_sampling, real_space_step
from .probe import CARTESIAN_NAMES, AberrationRanges, ProbeGeometry, from_cartesian, to_cartesian, vacuum_pattern
from .probe_epie import (
    EPIESearch,
    EPIESearchOptions,
    ScanData,
    check_overlap,
    conditioning_warnings,
    estimate_scan_rotation,
    polar_uncertainty,
    search_aberrations,
)
from .probe_overlap import (
    MIN_OVERLAP,
    PAIR_DISTANCE,
    SEARCHABLE,
    OverlapLoss,
    OverlapSearch,
    RecoveryOptions,
    neighbour_pairs,
    overlap_search,
    search_ranges,
    start_vector,
)
from .reconstruction import DeepCDIReconstruction

__all__ = [
    "MIN_OVERLAP", "PAIR_DISTANCE", "SEARCHABLE", "METHODS", "EPIESearchOptions", "OverlapLoss", "ProbeRecovery",
    "RecoveryOptions", "aberration_errors", "fit_probe_aberrations", "neighbour_pairs", "recover_probe",
]  # fmt: skip

#: The recovery methods; the first is the default.
METHODS = ("epie", "overlap")
#: Polar parameters carried by each searchable aberration.
_POLAR = {"C10": ("C10",), "C12": ("C12", "phi12"), "C21": ("C21", "phi21"), "C23": ("C23", "phi23")}
#: Keywords a DataCube brings for method="epie" (the reconstruction's calibration arguments).
_DATA_KEYWORDS = ("energy", "semiangle_cutoff", "scan_step", "angular_sampling", "rotation_deg", "transpose",
                  "vacuum_probe_intensity", "rolloff", "subsample", "verbose")


@dataclass
class ProbeRecovery:
    """Result of :func:`recover_probe`. Pass the object itself as ``DeepCDIReconstruction(..., probe=result)``.

    Attributes
    ----------
    aberrations
        The 7 probe parameters (py4DSTEM polar names; Å and rad): those in ``from_data`` recovered, the others the
        initial values.
    initial
        The starting parameters.
    method
        ``"epie"`` or ``"overlap"``.
    from_data
        Names of the parameters that came from the data (e.g. ``("C10", "C12", "phi12")``).
    uncertainty
        Error estimate of each parameter of ``from_data`` (Å, rad); NaN where the method gives none.
    warnings
        Messages about ill-conditioned parameters (also issued as ``UserWarning``).
    loss, initial_loss
        The method's loss at the recovered and at the initial probe.
    geometry, initial_geometry
        The probe geometry (data's for ``"epie"``, model's for ``"overlap"``) with the recovered and the initial
        aberrations.
    time_s
        Wall time of the search (s); ``evaluations`` the candidate probes evaluated.
    settings
        The method's settings.
    search
        The method's record (:class:`~.probe_epie.EPIESearch` or :class:`~.probe_overlap.OverlapSearch`).
    """

    aberrations: dict[str, float]
    initial: dict[str, float]
    method: str
    from_data: tuple[str, ...]
    uncertainty: dict[str, float]
    warnings: list[str]
    loss: float
    initial_loss: float
    geometry: ProbeGeometry
    initial_geometry: ProbeGeometry
    time_s: float
    evaluations: int
    settings: dict[str, Any] = field(default_factory=dict)
    search: EPIESearch | OverlapSearch | None = None

    @property
    def assumed(self) -> tuple[str, ...]:
        """The parameters not recovered from the data (kept at their initial values)."""
        return tuple(name for name in self.initial if name not in self.from_data)

    def visualize(self, path: str | Path | None = None, figsize=(13, 3.6)):
        """Figure: aberration function χ(k) in the aperture of the initial and the recovered probe, and the search
        (``"epie"``: the data error of every candidate against its C10, and the sub-blocks' estimates; ``"overlap"``:
        the loss curve). Returns the figure; saved to ``path`` if given."""
        fig, axes = plt.subplots(1, 4, figsize=figsize)
        for ax, label, geometry in ((axes[0], "initial", self.initial_geometry), (axes[1], "recovered", self.geometry)):
            n = geometry.detector_shape[0]
            extent = (np.array([-0.5, n - 0.5, n - 0.5, -0.5]) - n // 2) * geometry.angular_sampling
            fourier = geometry.probe_fourier
            chi = np.where(np.abs(fourier) > 0.1 * np.abs(fourier).max(), -np.angle(fourier), np.nan)
            ax.imshow(chi, cmap="twilight", vmin=-np.pi, vmax=np.pi, extent=extent)
            ab = geometry.aberrations
            ax.set_title(f"{label} χ(k): C10 {ab['C10']:.1f}, C12 {ab['C12']:.1f} Å", fontsize=9)
            ax.set_xlabel("mrad")
        if isinstance(self.search, EPIESearch):
            _draw_epie(self.search, axes[2], axes[3])
        elif isinstance(self.search, OverlapSearch):
            _draw_overlap(self.search, self.initial_loss, axes[2], axes[3])
        fig.tight_layout()
        if path is not None:
            save_figure(fig, path)
        return fig

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (parameters, which came from the data, error estimates, warnings, losses, settings);
        ``deepcdi reconstruct --probe`` reads its ``aberrations``."""
        out = {
            "aberrations": self.aberrations, "initial": self.initial, "method": self.method,
            "from_data": list(self.from_data), "assumed": list(self.assumed),
            "uncertainty": {k: (None if not math.isfinite(v) else v) for k, v in self.uncertainty.items()},
            "warnings": list(self.warnings), "loss": self.loss, "initial_loss": self.initial_loss,
            "time_s": self.time_s, "evaluations": self.evaluations, "settings": self.settings,
        }  # fmt: skip
        if isinstance(self.search, OverlapSearch):
            out["history"] = self.search.history.tolist()
        return out

    def __repr__(self) -> str:
        found = ", ".join(
            f"{k}={self.aberrations[k]:.4g}" + (f"±{self.uncertainty[k]:.2g}" if k in self.uncertainty else "")
            for k in self.from_data
        )
        return (
            f"ProbeRecovery({self.method}: {found}; assumed {', '.join(self.assumed) or 'none'}; loss "
            f"{self.initial_loss:.4g} -> {self.loss:.4g}, {self.evaluations} candidates in {self.time_s:.1f} s"
            f"{'; ' + str(len(self.warnings)) + ' warning(s)' if self.warnings else ''})"
        )


def _draw_epie(found: EPIESearch, ax_loss, ax_blocks) -> None:
    """The data error of every candidate against its C10; the sub-blocks' estimates of C10 and C12 (a, b)."""
    order = np.arange(len(found.losses))
    points = ax_loss.scatter(found.vectors[:, 0], found.losses, c=order, cmap="viridis", s=12)
    ax_loss.axvline(found.best[0], color="tab:red", lw=0.8, label="recovered")
    ax_loss.axvline(found.start[0], color="grey", ls=":", label="initial")
    ax_loss.set_xlabel("candidate C10 (Å)")
    ax_loss.set_ylabel("ePIE data error")
    ax_loss.legend(fontsize=8)
    plt.colorbar(points, ax=ax_loss, label="evaluation")
    for i in range(3):
        values = found.block_estimates[:, i] - found.best[i]
        ax_blocks.plot(np.full(len(values), i), values, "o", ms=4, color="tab:blue")
        ax_blocks.errorbar(i + 0.2, 0, yerr=found.sigma[i], fmt="s", color="tab:red", ms=4, capsize=3)
    ax_blocks.set_xticks(range(3), CARTESIAN_NAMES[:3])
    ax_blocks.set_ylabel("sub-block − recovered (Å)")
    ax_blocks.set_title("sub-blocks (blue), error estimate (red)", fontsize=9)


def _draw_overlap(found: OverlapSearch, initial_loss: float, ax_loss, ax_path) -> None:
    """The overlap loss curve and the best C10 after each iteration."""
    iterations = np.arange(1, len(found.history) + 1)
    ax_loss.semilogy(iterations, found.history, label="best")
    ax_loss.semilogy(iterations, found.trials.min(1), ".", ms=3, label="best trial")
    ax_loss.axhline(initial_loss, color="grey", ls=":", label="initial")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("overlap disagreement")
    ax_loss.legend(fontsize=8)
    ax_path.plot(iterations, found.path[:, 0])
    ax_path.set_xlabel("iteration")
    ax_path.set_ylabel("best C10 (Å)")


# ---------------------------------------------------------------------------------------------- recover_probe
def recover_probe(
    data,
    model=None,
    initial: Mapping[str, float] | None = None,
    n_pairs: int = RecoveryOptions.n_pairs,
    n_iterations: int = RecoveryOptions.n_iterations,
    n_trials: int = RecoveryOptions.n_trials,
    *,
    method: str = METHODS[0],
    ranges: AberrationRanges | None = None,
    search: Sequence[str] | None = None,
    pair_distance: float | None = RecoveryOptions.pair_distance,
    final_radius: float = RecoveryOptions.final_radius,
    normalize: bool = RecoveryOptions.normalize,
    random_block: bool = RecoveryOptions.random_block,
    seed: int = RecoveryOptions.seed,
    precision: str = RecoveryOptions.precision,
    block: int = EPIESearchOptions.block,
    n_blocks: int = EPIESearchOptions.n_blocks,
    epie_iterations: int = EPIESearchOptions.epie_iterations,
    batch: int = EPIESearchOptions.batch,
    radii: tuple[float, ...] = EPIESearchOptions.radii,
    tolerance: float = EPIESearchOptions.tolerance,
    detector_angle: float | None = EPIESearchOptions.detector_angle,
    device: str | None = None,
    progress: bool = True,
    **data_kwargs: Any,
) -> ProbeRecovery:
    """Recover the probe's aberrations from the data.

    Parameters
    ----------
    data
        A py4DSTEM DataCube (or 4-D array of counts) with its calibration keywords (below), or a
        :class:`~py4dstem_deepcdi.DeepCDIReconstruction` (preprocessed or not; its data, calibration, scan rotation,
        vacuum probe and aberrations are used).
    model
        ``"overlap"``: the probe-conditioned model (for a DataCube; a reconstruction brings its own). ``"epie"``:
        optional, its reference aberrations and aperture roll-off serve as defaults.
    initial
        Starting parameters (polar names, Å/rad): ``"epie"`` needs them (or a model or reconstruction to take
        them from); ``"overlap"`` draws a random probe inside the ranges when None, as in the paper.
    method
        ``"epie"`` (default) or ``"overlap"``.
    ranges
        Bounds of the candidates (:class:`~py4dstem_deepcdi.probe.AberrationRanges`); ``"overlap"``: default the
        model's training ranges, inside which they must lie; ``"epie"``: default none, and given ranges must fit the
        detector's real-space window.
    search
        The aberrations searched, of C10, C12, C21, C23 (each with its angle); default ``("C10", "C12")`` for
        ``"epie"`` and all four for ``"overlap"``. The others stay at their initial values.
    n_pairs, n_iterations, n_trials, pair_distance, final_radius, normalize, random_block, seed, precision
        The ``"overlap"`` settings, as :class:`~.probe_overlap.RecoveryOptions` describes them.
    block, n_blocks, epie_iterations, batch, radii, tolerance, detector_angle
        The ``"epie"`` settings, as :class:`~.probe_epie.EPIESearchOptions` describes them.
    device
        ``"overlap"``: the network's device (default the reconstruction's, else ``"cpu"``).
    progress
        tqdm progress bar.
    **data_kwargs
        For a DataCube: ``energy`` (eV) and ``semiangle_cutoff`` (mrad), required; ``"epie"`` also takes
        ``scan_step`` (Å), ``angular_sampling`` (mrad) (default: the calibration), ``rotation_deg``, ``transpose``
        (default: py4DSTEM's centre-of-mass estimate), ``vacuum_probe_intensity`` (the data's detector; used as the
        aperture), ``rolloff`` (mrad; default the model's, else 2), ``subsample`` and ``verbose`` (ignored: the
        progress bar is ``progress``); ``"overlap"`` any
        :class:`~py4dstem_deepcdi.DeepCDIReconstruction` argument.

    Returns
    -------
    ProbeRecovery
        The parameters, which came from the data, their error estimates, warnings and the search record.

    Raises
    ------
    ValueError
        An unknown method; settings the options refuse; a DataCube without energy or semi-angle; ``"epie"``
        without initial aberrations, with a non-square scan step, a vacuum pattern of another shape, a scan too
        small for its blocks, a step so large that positions do not overlap, or ranges (or an initial probe) that
        do not fit the detector's window; ``"overlap"``: a fixed-probe model, ranges outside its training ranges, an
        initial probe outside the ranges, a scan without overlapping pairs.
    TypeError
        A keyword that the method does not take.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "epie":
        options = EPIESearchOptions(
            block=block, n_blocks=n_blocks, epie_iterations=epie_iterations, batch=batch, radii=radii,
            search=EPIESearchOptions.search if search is None else search, tolerance=tolerance,
            detector_angle=detector_angle,
        )  # fmt: skip
        return _recover_epie(data, model, initial, options, ranges, progress, data_kwargs)
    options = RecoveryOptions(
        n_pairs=n_pairs, n_iterations=n_iterations, n_trials=n_trials, ranges=ranges,
        search=RecoveryOptions.search if search is None else search, pair_distance=pair_distance,
        final_radius=final_radius, normalize=normalize, random_block=random_block, seed=seed, precision=precision,
    )  # fmt: skip
    return _recover_overlap(data, model, initial, options, device, progress, data_kwargs)


def _from_data(search: Sequence[str]) -> tuple[str, ...]:
    return tuple(name for s in search for name in _POLAR[s])


# ---------------------------------------------------------------------------------------------- method="epie"
def _recover_epie(data, model, initial, options: EPIESearchOptions, ranges, progress: bool,
                  data_kwargs: dict[str, Any]) -> ProbeRecovery:
    """:func:`recover_probe` with ``method="epie"``."""
    scan, reference = _scan_data(data, model, data_kwargs)
    if initial is None and reference is None:
        raise ValueError("method='epie' needs the initial aberrations: recover_probe(..., initial={'C10': -100.0}) "
                         "(or a model or reconstruction to take them from)")
    start = from_cartesian(to_cartesian(initial if initial is not None else reference))
    initial_geometry = scan.geometry(start)  # refuses a start probe that does not fit the window
    check_overlap(scan, initial_geometry)
    if ranges is not None:
        ranges.check(initial_geometry)
        problems = ranges.contains(start)
        if problems:
            raise ValueError(f"the initial probe lies outside the search ranges: {'; '.join(problems)}")
    found = search_aberrations(scan, start, options, ranges, progress)
    recovered = from_cartesian(found.best)
    for name in start:  # the aberrations not searched keep their exact initial values
        if name not in _from_data(options.search):
            recovered[name] = start[name]
    messages = conditioning_warnings(found, scan, options)
    for message in messages:
        warnings.warn(message, stacklevel=3)
    sigma = polar_uncertainty(found.best, found.sigma)
    try:
        geometry = scan.geometry(recovered)
    except ValueError as exc:
        raise ValueError(f"the search ended at a probe that does not fit the detector's window ({exc}): check that "
                         "the aperture model matches the data (vacuum_probe_intensity, rolloff), bound the search "
                         "with ranges=AberrationRanges(...) or start closer") from None
    return ProbeRecovery(
        aberrations=recovered, initial=start, method="epie", from_data=_from_data(options.search),
        uncertainty={k: sigma[k] for k in _from_data(options.search)}, warnings=messages, loss=found.loss,
        initial_loss=found.initial_loss, geometry=geometry, initial_geometry=initial_geometry,
        time_s=found.time_s, evaluations=len(found.vectors), search=found,
        settings={
            "block": options.block, "n_blocks": options.n_blocks, "epie_iterations": options.epie_iterations,
            "batch": options.batch, "radii": list(options.radii), "search": list(options.search),
            "tolerance": options.tolerance, "detector_angle": options.detector_angle,
            "main_block": found.main_block.tolist(), "blocks": found.blocks.tolist(),
            "ranges": None if ranges is None else ranges.to_dict(), "scan_step_A": scan.step,
            "angular_sampling_mrad": scan.angular, "rotation_deg": scan.rotation_deg, "transpose": scan.transpose,
            "vacuum_probe": scan.vacuum is not None, "rolloff_mrad": scan.rolloff,
        },
    )  # fmt: skip


def _scan_data(data, model, data_kwargs: dict[str, Any]) -> tuple[ScanData, dict[str, float] | None]:
    """The :class:`ScanData` of a reconstruction or a DataCube, and the reference aberrations (the reconstruction's
    or the model's, else None)."""
    if is_reconstruction(data):
        if data_kwargs:
            raise TypeError(f"recover_probe on a reconstruction takes no data keywords, got {sorted(data_kwargs)}")
        if data.data is None:
            data.preprocess()
        step = data.data.scan_step
        _require_square(step)
        patterns = scan_patterns(data)
        g = data.geometry
        scan = ScanData(patterns, float(step[0]), float(data.data.data_angular_sampling), float(data.data.rotation_deg),
                        bool(data.data.transpose), g.energy, g.semiangle_cutoff, g.rolloff,
                        _vacuum(reconstruction_vacuum(data, patterns.shape[2:]), patterns.shape[2:]))
        return scan, dict(g.aberrations)
    unknown = sorted(set(data_kwargs) - set(_DATA_KEYWORDS))
    if unknown:
        raise TypeError(f"recover_probe(method='epie') got unknown keywords {unknown}; it takes {_DATA_KEYWORDS}")
    if "energy" not in data_kwargs or "semiangle_cutoff" not in data_kwargs:
        raise ValueError("recover_probe on a DataCube needs energy (eV) and semiangle_cutoff (mrad) keywords")
    model = as_model(model) if model is not None else None
    kw = data_kwargs
    patterns = datacube_array(data)
    subsample = int(kw.get("subsample", 1))
    if subsample < 1:
        raise ValueError(f"subsample must be >= 1, got {subsample}")
    step = real_space_step(data, kw.get("scan_step"))
    _require_square(step)
    rolloff = float(kw.get("rolloff", model.geometry.rolloff if model is not None else 2.0))
    wavelength = float(electron_wavelength_angstrom(float(kw["energy"])))
    scan = ScanData(
        patterns[::subsample, ::subsample] if subsample > 1 else patterns, step[0] * subsample,
        detector_sampling(data, wavelength, kw.get("angular_sampling")), float(kw.get("rotation_deg") or 0.0),
        bool(kw.get("transpose") or False), float(kw["energy"]), float(kw["semiangle_cutoff"]), rolloff,
        _vacuum(kw.get("vacuum_probe_intensity"), patterns.shape[2:]),
    )  # fmt: skip
    if kw.get("rotation_deg") is None or kw.get("transpose") is None:
        rotation, transpose = estimate_scan_rotation(scan)
        scan = ScanData(scan.patterns, scan.step, scan.angular,
                        rotation if kw.get("rotation_deg") is None else scan.rotation_deg,
                        transpose if kw.get("transpose") is None else scan.transpose,
                        scan.energy, scan.semiangle, scan.rolloff, scan.vacuum)
    return scan, dict(model.geometry.aberrations) if model is not None else None


def _require_square(step: Sequence[float]) -> None:
    if abs(step[0] - step[1]) > 1e-9 * step[0]:
        raise ValueError(f"method='epie' needs a square scan step, got {tuple(step)} Å")


def _vacuum(vacuum, detector_shape: tuple[int, int]) -> np.ndarray | None:
    """The vacuum pattern as an array of the data's detector shape (None stays None); ValueError otherwise."""
    if vacuum is None:
        return None
    pattern = vacuum_pattern(vacuum)
    if pattern.shape != tuple(detector_shape):
        raise ValueError(f"vacuum_probe_intensity has shape {pattern.shape}, but the data's patterns are "
                         f"{tuple(detector_shape)}: give the vacuum pattern recorded on the data's detector")
    return pattern


# ---------------------------------------------------------------------------------------------- method="overlap"
def _recover_overlap(data, model, initial, options: RecoveryOptions, device: str | None, progress: bool,
                     reconstruction_kwargs: dict[str, Any]) -> ProbeRecovery:
    """:func:`recover_probe` with ``method="overlap"``."""
    recon = _as_reconstruction(data, model, initial, device, reconstruction_kwargs)
    model = recon.model
    model.require_conditioned("recover_probe")
    ranges = search_ranges(options.ranges, model.aberration_ranges)
    rng = np.random.default_rng(options.seed)
    if recon.data is None:
        recon.preprocess()
    start = start_vector(initial, ranges, rng)
    found = overlap_search(model, recon.data, start, ranges, options, rng, device or recon.device, progress)
    recovered = from_cartesian(found.best)
    return ProbeRecovery(
        aberrations=recovered, initial=from_cartesian(start), method="overlap", from_data=_from_data(options.search),
        uncertainty=dict.fromkeys(_from_data(options.search), math.nan), warnings=[], loss=found.best_loss,
        initial_loss=found.initial_loss, geometry=model.geometry.replace(aberrations=recovered),
        initial_geometry=model.geometry.replace(aberrations=from_cartesian(start)), time_s=found.time_s,
        evaluations=found.evaluations, search=found,
        settings={
            "n_pairs": len(found.pairs), "n_iterations": options.n_iterations, "n_trials": options.n_trials,
            "ranges": ranges.to_dict(), "search": list(options.search), "pair_distance_A": found.distance,
            "stride_steps": found.stride, "final_radius": float(options.final_radius),
            "normalize": bool(options.normalize), "seed": options.seed, "precision": options.precision,
        },
    )  # fmt: skip


def _as_reconstruction(
    data, model, initial: Mapping[str, float] | None, device: str | None, reconstruction_kwargs: dict[str, Any]
) -> DeepCDIReconstruction:
    """``data`` itself if it is a reconstruction, else a reconstruction of the DataCube ``data`` with ``model`` at
    the initial (or the model's reference) probe."""
    if isinstance(data, DeepCDIReconstruction):
        if model is not None and as_model(model) is not data.model:
            raise ValueError("recover_probe got a reconstruction and another model; the reconstruction's model is used")
        return data
    if model is None:
        raise ValueError(
            "method='overlap' needs the probe-conditioned model: recover_probe(datacube, model, method='overlap', "
            "energy=..., semiangle_cutoff=...)"
        )
    model = as_model(model, device=device or "cpu")  # loaded once, handed on as the object
    model.require_conditioned("recover_probe")
    if "energy" not in reconstruction_kwargs or "semiangle_cutoff" not in reconstruction_kwargs:
        raise ValueError("recover_probe on a DataCube needs energy (eV) and semiangle_cutoff (mrad) keywords")
    kwargs = {"verbose": False, **reconstruction_kwargs}
    if device:
        kwargs["device"] = device
    reference = initial if initial is not None else model.geometry.aberrations
    return DeepCDIReconstruction(data, model=model, probe=dict(reference), **kwargs)


# ---------------------------------------------------------------------------------------------- py4DSTEM's fit
def fit_probe_aberrations(
    probe: np.ndarray, geometry: ProbeGeometry, aperture: np.ndarray | None = None
) -> dict[str, float]:
    """The 7 parameters (polar names, Å and rad) of a complex real-space probe (centred, on ``geometry``'s grid).

    py4DSTEM's aberration-surface fit (``fit_aberration_surface``: unwrapped Fourier phase, amplitude-weighted least
    squares on the α^(m+1) cos/sin(nφ) basis up to radial order 2 and angular order 3, whose coefficients are the
    Cartesian parameters in Å). ``aperture``: a detector intensity (centred, e.g. the vacuum pattern) whose square
    root weights the fit instead of the probe's own Fourier amplitude (which a probe-updating ePIE leaves noisy
    outside the aperture). Raises ValueError if ``probe`` (or ``aperture``) is not of the geometry's shape.
    """
    probe = np.asarray(probe)
    if probe.shape != geometry.detector_shape or not np.iscomplexobj(probe):
        raise ValueError(
            f"probe must be a complex array of the geometry's shape {geometry.detector_shape}, "
            f"got {probe.dtype} {probe.shape}"
        )
    fourier = np.fft.fft2(np.fft.ifftshift(probe))  # corner-centred, as py4DSTEM keeps it
    if aperture is not None:
        aperture = vacuum_pattern(aperture)
        if aperture.shape != geometry.detector_shape:
            raise ValueError(f"aperture must have the geometry's shape {geometry.detector_shape}, got {aperture.shape}")
        fourier = np.sqrt(np.fft.ifftshift(np.maximum(aperture, 0))) * np.exp(1j * np.angle(fourier))
    orders = (3, 3)  # max angular order, max radial order: exactly the 7 parameters and a constant
    _, coefficients = fit_aberration_surface(fourier, geometry.sampling, geometry.energy, *orders, True)
    _, mn = aberrations_basis_function(geometry.detector_shape, geometry.sampling, geometry.energy, *orders)
    names = {(1, 0, 0): "C10", (1, 2, 0): "C12a", (1, 2, 1): "C12b", (2, 1, 0): "C21a", (2, 1, 1): "C21b",
             (2, 3, 0): "C23a", (2, 3, 1): "C23b"}
    cartesian = dict.fromkeys(CARTESIAN_NAMES, 0.0)
    for (m, n, a), c in zip(mn.tolist(), np.asarray(coefficients).tolist()):
        if (m, n, a) in names:
            cartesian[names[(m, n, a)]] = float(c)
    return from_cartesian([cartesian[k] for k in CARTESIAN_NAMES])


def aberration_errors(recovered: Mapping[str, float], truth: Mapping[str, float]) -> dict[str, float]:
    """Errors of recovered parameters (Å): ``C10`` signed, and the vector error |Δ(a, b)| of C12, C21 and C23
    (which accounts for the angle)."""
    a, b = to_cartesian(recovered), to_cartesian(truth)
    out = {"C10": float(a[0] - b[0])}
    for i, name in enumerate(("C12", "C21", "C23")):
        out[name] = float(np.hypot(*(a[1 + 2 * i : 3 + 2 * i] - b[1 + 2 * i : 3 + 2 * i])))
    return out
