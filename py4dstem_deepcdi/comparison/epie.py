"""The iterative baseline: py4DSTEM's ePIE on the data, probe and positions of a deep-CDI reconstruction.

ePIE is py4DSTEM's gradient-descent engine (``SingleslicePtychography``, ``reconstruction_method="GD"``) with
``max_batch_size=1``: one shuffled pass over all patterns per iteration with Maiden–Rodenburg updates. It runs on
the raw patterns of the datacube (py4DSTEM centres them itself) with the energy, semi-angle, aberrations, aperture
roll-off (or the measured vacuum probe), scan step, scan rotation and transpose of the reconstruction.

    result = run_epie(recon, num_iter=50)                           # keywords are EPIEOptions fields
    result = run_epie(datacube, geometry, options=EPIEOptions(num_iter=10, fix_probe=False))
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import py4DSTEM

from ..backend import asnumpy
from ..preprocessing import datacube_array, detector_sampling, real_space_step
from ..probe import vacuum_pattern
from ..scan import calibrated_datacube, scan_positions
from ._json import jsonable, plain
from .inputs import is_reconstruction, reconstruction_scan, reconstruction_vacuum, scan_patterns, subsample_of

#: normalised ePIE error (py4DSTEM's: squared amplitude error over the mean pattern intensity) above which the
#: reconstruction has diverged: a sane one stays below ~1 (4 is the bound for any pair of equal-norm amplitudes)
EPIE_ERROR_LIMIT = 10.0
#: growth of the error from its minimum to the last iteration that counts as divergence
EPIE_ERROR_GROWTH = 100.0
#: largest disagreement (object pixels) between py4DSTEM's probe positions and this package's scan convention
POSITION_TOLERANCE_PX = 1e-3
#: preprocess arguments with which py4DSTEM rewrites or replaces the datacube it is given
_RESHAPING_KWARGS = ("diffraction_intensities_shape", "in_place_datacube_modification")


class EPIEDivergenceError(RuntimeError):
    """py4DSTEM's ePIE produced NaN or an exploding error: its image must not be used."""


@dataclass(frozen=True)
class EPIEOptions:
    """How ePIE runs (not what it runs on). Every field is also a keyword of :func:`run_epie`.

    Raises ``ValueError`` for ``num_iter < 1``, a non-positive or non-finite ``step_size`` or an unknown
    ``on_divergence``.
    """

    num_iter: int = field(default=50, metadata={"help": "ePIE iterations (one shuffled pass over all patterns each)"})
    step_size: float = field(
        default=0.5, metadata={"help": "step size of the object and probe updates (dimensionless, 0.1-1)"}
    )
    fix_probe: bool = field(default=True, metadata={"help": "keep the probe fixed (True) or update it too"})
    seed: int = field(default=0, metadata={"help": "seed of ePIE's random pattern order"})
    device: str = field(default="cpu", metadata={"help": "'cpu' or 'gpu' (py4DSTEM with CuPy)"})
    progress: bool = field(default=True, metadata={"help": "show py4DSTEM's progress bar"})
    store_iterations: bool = field(
        default=False, metadata={"help": "keep the complex object after every iteration (EPIEResult.object_iterations)"}
    )
    on_divergence: str = field(
        default="raise",
        metadata={"help": "'raise' (EPIEDivergenceError) or 'warn' (return the result marked diverged=True)"},
    )
    preprocess_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra arguments for py4DSTEM's preprocess (JSON object)"}
    )
    reconstruct_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "extra arguments for py4DSTEM's reconstruct, e.g. {'fix_probe_com': false} (JSON object)"},
    )

    def __post_init__(self) -> None:
        if self.on_divergence not in ("raise", "warn"):
            raise ValueError(f"on_divergence must be 'raise' or 'warn', got {self.on_divergence!r}")
        if int(self.num_iter) < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be a positive number, got {self.step_size!r}")
        object.__setattr__(self, "num_iter", int(self.num_iter))
        object.__setattr__(self, "step_size", float(self.step_size))
        object.__setattr__(self, "preprocess_kwargs", dict(self.preprocess_kwargs or {}))
        object.__setattr__(self, "reconstruct_kwargs", dict(self.reconstruct_kwargs or {}))

    @classmethod
    def build(cls, options: EPIEOptions | None = None, **settings: Any) -> EPIEOptions:
        """``options`` (default: the defaults) with the fields named in ``settings`` replaced.

        Raises ``TypeError`` for a name that is not a field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown ePIE settings {unknown}; EPIEOptions fields are {sorted(names)}")
        return dataclasses.replace(options or cls(), **settings)


@dataclass
class EPIEResult:
    """One py4DSTEM ePIE run.

    Attributes
    ----------
    phase
        ``np.angle`` of the object (rad) cropped to the probe positions' bounding box (float32).
    object
        The whole complex object py4DSTEM reconstructed (padded canvas).
    sampling
        Object pixel size (Å) per axis.
    positions_A
        (J, 2) probe positions (Å, detector frame) the run used, in the caller's frame.
    origin_px
        Object pixel of the point 0 Å: object pixel = ``positions_A / sampling + origin_px``.
    crop_origin_px
        Object pixel of ``phase[0, 0]``.
    error_history
        py4DSTEM's normalised error after every iteration.
    time_s, preprocess_s
        Wall time (s) of ``reconstruct`` and of ``preprocess``.
    num_iter, step_size, fix_probe, rotation_deg, transpose
        The settings used (rotation in degrees).
    probe
        The final probe (complex, centred).
    diverged
        True when the run diverged and ``on_divergence="warn"`` returned it anyway.
    object_iterations
        Complex object after every iteration (``store_iterations=True``), else None.
    parameters
        Everything else passed to py4DSTEM (JSON-able).
    ptychography
        py4DSTEM's ``SingleslicePtychography`` object itself (``.object``, ``.probe``, ``.error``, ``visualize()``,
        written into a comparison file and reopened by ``py4DSTEM.read``).
    """

    phase: np.ndarray
    object: np.ndarray
    sampling: tuple[float, float]
    positions_A: np.ndarray
    origin_px: np.ndarray
    crop_origin_px: tuple[int, int]
    error_history: np.ndarray
    time_s: float
    preprocess_s: float
    num_iter: int
    step_size: float
    fix_probe: bool
    rotation_deg: float
    transpose: bool
    probe: np.ndarray
    diverged: bool = False
    object_iterations: list[np.ndarray] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    ptychography: Any = field(default=None, repr=False)

    def to_pixels(self, points_A: np.ndarray) -> np.ndarray:
        """Object-pixel coordinates of points (..., 2) given in Å (detector frame, the frame of ``positions_A``)."""
        return np.asarray(points_A, dtype=np.float64) / np.asarray(self.sampling) + self.origin_px

    @property
    def final_error(self) -> float:
        """py4DSTEM's normalised error after the last iteration (NaN if none ran)."""
        return float(self.error_history[-1]) if len(self.error_history) else float("nan")

    @property
    def ms_per_position_iteration(self) -> float:
        """Reconstruction time per probe position per iteration (ms)."""
        return 1e3 * self.time_s / max(len(self.positions_A) * max(self.num_iter, 1), 1)

    def summary(self) -> dict[str, Any]:
        """Numbers of the run (JSON-able)."""
        return plain({
            "num_iter": self.num_iter,
            "step_size": self.step_size,
            "fix_probe": self.fix_probe,
            "rotation_deg": self.rotation_deg,
            "transpose": self.transpose,
            "positions": len(self.positions_A),
            "sampling_A": list(self.sampling),
            "time_s": self.time_s,
            "preprocess_s": self.preprocess_s,
            "ms_per_position_iteration": self.ms_per_position_iteration,
            "final_error": self.final_error,
            "diverged": self.diverged,
        })

    def __repr__(self) -> str:
        state = "DIVERGED, " if self.diverged else ""
        return (
            f"EPIEResult({state}{self.num_iter} iterations on {len(self.positions_A)} positions in {self.time_s:.2f} s "
            f"({self.ms_per_position_iteration:.3g} ms/position/iteration), error {self.final_error:.3g}, "
            f"phase {self.phase.shape} at {self.sampling[0]:.4g} Å/px)"
        )


# ================================================================================================== inputs
@dataclass(frozen=True)
class _EPIEData:
    """What ePIE runs on, resolved: raw patterns (Rx, Ry, Qx, Qy) counts, geometry, scan step (Å), detector pixel
    (mrad), scan rotation (deg) and transpose (None: py4DSTEM estimates them), explicit positions (J, 2) Å or None,
    vacuum pattern or None, the subsampling applied to the caller's scan, and the positions mask (Rx, Ry) or None
    (then J is its count)."""

    patterns: np.ndarray
    geometry: Any
    step: tuple[float, float]
    angular: float
    rotation_deg: float | None
    transpose: bool | None
    positions: np.ndarray | None
    vacuum: np.ndarray | None
    subsample: int
    positions_mask: np.ndarray | None = None

    @property
    def scan_shape(self) -> tuple[int, int]:
        return int(self.patterns.shape[0]), int(self.patterns.shape[1])


def _from_reconstruction(recon, geometry, scan_step, angular_sampling, rotation_deg, transpose, vacuum):
    """(patterns, geometry, step Å, detector pixel mrad, rotation deg, transpose, vacuum, subsample) of a
    preprocessed reconstruction; the caller's values replace the reconstruction's where not None."""
    if recon.data is None:
        raise RuntimeError("run_epie needs a preprocessed reconstruction: call recon.preprocess() first")
    patterns = scan_patterns(recon)
    # recon.data.scan_step is the step after subsampling, the step of the patterns ePIE gets
    step = tuple(float(s) for s in recon.data.scan_step) if scan_step is None else real_space_step(None, scan_step)
    angular = recon.data.data_angular_sampling if angular_sampling is None else float(angular_sampling)
    rotation_deg = recon.data.rotation_deg if rotation_deg is None else rotation_deg
    transpose = recon.data.transpose if transpose is None else transpose
    if vacuum is None:
        vacuum = reconstruction_vacuum(recon, patterns.shape[2:])
    return patterns, geometry or recon.geometry, step, angular, rotation_deg, transpose, vacuum, subsample_of(recon)


def _from_datacube(data, geometry, scan_step, angular_sampling, rotation_deg, transpose, vacuum):
    """The same tuple as :func:`_from_reconstruction` for a DataCube or a 4-D array (calibrations from the
    DataCube where not given)."""
    if geometry is None:
        raise ValueError("run_epie on a datacube needs geometry= (a ProbeGeometry: energy, semi-angle, aberrations)")
    patterns = datacube_array(data)
    step = real_space_step(data, scan_step)
    angular = detector_sampling(data, geometry.wavelength, angular_sampling)
    return patterns, geometry, step, angular, rotation_deg, transpose, vacuum, 1


def _resolve_data(data, geometry, *, positions, rotation_deg, transpose, scan_step, angular_sampling,
                  vacuum_probe_intensity, positions_mask=None) -> _EPIEData:
    """The run's inputs from a reconstruction (its settings, measured positions and positions mask fill what the
    caller leaves None) or a datacube."""
    resolve = _from_reconstruction if is_reconstruction(data) else _from_datacube
    patterns, geometry, step, angular, rotation_deg, transpose, vacuum_probe_intensity, subsample = resolve(
        data, geometry, scan_step, angular_sampling, rotation_deg, transpose, vacuum_probe_intensity
    )
    if is_reconstruction(data) and positions is None and positions_mask is None:
        positions, positions_mask = reconstruction_scan(data)
    scan_shape = tuple(patterns.shape[:2])
    if positions_mask is not None:
        positions_mask = np.asarray(positions_mask, dtype=bool)
        if positions_mask.shape != scan_shape:
            raise ValueError(f"positions_mask must have the scan's shape {scan_shape}, got {positions_mask.shape}")
    if positions is None and abs(step[0] - step[1]) > 1e-9 * step[0]:
        if rotation_deg is None or transpose is None:
            raise ValueError("a non-square scan step needs rotation_deg and transpose (or explicit positions)")
        positions = scan_positions(scan_shape, step, float(rotation_deg), bool(transpose))
        positions = positions if positions_mask is None else positions[positions_mask.ravel()]
    if positions is not None:
        positions = np.asarray(positions, dtype=np.float64)
        expected = (scan_shape[0] * scan_shape[1] if positions_mask is None else int(positions_mask.sum()), 2)
        if positions.shape != expected:
            raise ValueError(f"positions must have shape {expected} (Å), got {positions.shape}")
    vacuum = None
    if vacuum_probe_intensity is not None:
        vacuum = vacuum_pattern(vacuum_probe_intensity)
        if vacuum.shape != tuple(patterns.shape[2:]):
            raise ValueError(
                f"vacuum_probe_intensity has shape {vacuum.shape} but the data's patterns are "
                f"{tuple(patterns.shape[2:])}; give the vacuum pattern recorded with the same detector binning as "
                "the data"
            )
    return _EPIEData(patterns, geometry, (float(step[0]), float(step[1])), float(angular), rotation_deg, transpose,
                     positions, vacuum, subsample, positions_mask)


def _private_datacube(d: _EPIEData, preprocess_kwargs: dict[str, Any]) -> py4DSTEM.DataCube:
    """A calibrated DataCube of the patterns, never the caller's: its calibration, tree and data stay untouched.

    The array is copied when py4DSTEM would rewrite it (reshaping arguments) or when it is a subsampled view.
    """
    reshaping = any(k in preprocess_kwargs for k in _RESHAPING_KWARGS)
    copy = reshaping or d.subsample > 1
    array = np.array(d.patterns, dtype=np.float32, copy=True) if copy else np.asarray(d.patterns)
    return calibrated_datacube(array, d.step[0], d.angular)


def _gpu_error(exc: BaseException) -> RuntimeError:
    return RuntimeError(
        "device='gpu': py4DSTEM's ptychography needs CuPy (cupyx) and a CUDA GPU, and importing it failed "
        f"({exc}); install the CuPy wheel that matches your CUDA (e.g. `pip install cupy-cuda12x`) or use device='cpu'"
    )


# ================================================================================================== py4DSTEM
def _preprocessed_ptychography(d: _EPIEData, options: EPIEOptions):
    """py4DSTEM's ``SingleslicePtychography`` built and preprocessed for ``d``: (ptycho, preprocess time s).

    Raises ``RuntimeError`` with an installation hint when ``device="gpu"`` and CuPy is missing.
    """
    explicit = d.positions is not None
    constructor_args = {
        "energy": d.geometry.energy,
        "datacube": _private_datacube(d, options.preprocess_kwargs),
        "semiangle_cutoff": d.geometry.semiangle_cutoff,
        "rolloff": d.geometry.rolloff,
        "vacuum_probe_intensity": d.vacuum,
        "polar_parameters": dict(d.geometry.aberrations),  # py4DSTEM mutates the dict it is given
        "initial_scan_positions": d.positions,
        "positions_mask": d.positions_mask,
        "object_type": "complex",
        "device": options.device,
        "verbose": False,
    }
    preprocess_args = {
        "plot_center_of_mass": False,
        "plot_rotation": False,
        "plot_probe_overlaps": False,
        "force_com_rotation": 0.0 if explicit else (None if d.rotation_deg is None else float(d.rotation_deg)),
        "force_com_transpose": False if explicit else (None if d.transpose is None else bool(d.transpose)),
        **options.preprocess_kwargs,
    }
    try:
        ptycho = py4DSTEM.process.phase.SingleslicePtychography(**constructor_args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            ptycho.preprocess(**preprocess_args)
            return ptycho, time.perf_counter() - start
    except ModuleNotFoundError as exc:
        if "cup" in str(exc):
            raise _gpu_error(exc) from exc
        raise


def _py4dstem_scan_rotation(ptycho) -> tuple[float, bool]:
    """Scan rotation (deg) and transpose that py4DSTEM's ``preprocess`` used (forced or estimated).

    Private attributes: py4DSTEM 0.14 exposes them only through a file written by ``save``.
    """
    return float(np.rad2deg(ptycho._rotation_best_rad)), bool(ptycho._rotation_best_transpose)


def _scan_frame(ptycho, d: _EPIEData) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """The run's probe positions in the caller's frame and where py4DSTEM put them.

    Returns (positions Å (J, 2), object pixel of 0 Å (2,), rotation deg, transpose). Raises ``RuntimeError`` when
    py4DSTEM's positions are not this package's :func:`~py4dstem_deepcdi.scan.scan_positions` shifted (the
    rotation/transpose conventions would disagree).
    """
    sampling = np.asarray(ptycho.sampling, dtype=np.float64)
    positions_px = np.asarray(ptycho.positions, dtype=np.float64) / sampling
    if d.positions is not None:
        positions_A = d.positions
        rotation = float(d.rotation_deg) if d.rotation_deg is not None else 0.0
        transpose = bool(d.transpose) if d.transpose is not None else False
    else:
        rotation, transpose = _py4dstem_scan_rotation(ptycho)
        positions_A = scan_positions(d.scan_shape, d.step, rotation, transpose)
        if d.positions_mask is not None:  # py4DSTEM masks the raster grid (and rotates the kept positions)
            positions_A = positions_A[d.positions_mask.ravel()]
    origin = (positions_px - positions_A / sampling).mean(0)
    residual = float(np.abs(positions_px - positions_A / sampling - origin).max())
    if residual > POSITION_TOLERANCE_PX:
        raise RuntimeError(
            f"py4DSTEM placed the probe positions differently from this package's scan convention (residual "
            f"{residual:.3g} px): the rotation/transpose conventions disagree; please report this"
        )
    return np.asarray(positions_A, dtype=np.float64), origin, rotation, transpose


def _reconstruct(ptycho, options: EPIEOptions) -> float:
    """Run ePIE (``"GD"``, ``max_batch_size=1``) on a preprocessed ptychography; returns the wall time (s)."""
    reconstruct_args = {
        "num_iter": options.num_iter,
        "reconstruction_method": "GD",
        "max_batch_size": 1,
        "step_size": options.step_size,
        "fix_probe": bool(options.fix_probe),
        "seed_random": int(options.seed),
        "progress_bar": bool(options.progress),
        "store_iterations": bool(options.store_iterations),
        "reset": True,
        **options.reconstruct_kwargs,
    }
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        start = time.perf_counter()
        ptycho.reconstruct(**reconstruct_args)
        return time.perf_counter() - start


def _check_divergence(errors: np.ndarray, obj: np.ndarray, options: EPIEOptions) -> bool:
    """Whether the run diverged: NaN/infinite values, an error above :data:`EPIE_ERROR_LIMIT`, or a final error
    :data:`EPIE_ERROR_GROWTH` times its minimum. Raises :class:`EPIEDivergenceError` (``on_divergence="raise"``)
    or warns (``"warn"``) when it did."""
    finite = bool(np.all(np.isfinite(errors)) and np.all(np.isfinite(obj)))
    exploded = finite and len(errors) > 0 and (
        errors.max() > EPIE_ERROR_LIMIT or errors[-1] > EPIE_ERROR_GROWTH * max(errors.min(), 1e-12)
    )
    if finite and not exploded:
        return False
    what = "NaN/infinite values" if not finite else f"an exploding error ({errors.min():.3g} → {errors.max():.3g})"
    message = (
        f"py4DSTEM's ePIE diverged after {len(errors)} iterations with step_size={options.step_size}: {what}. Lower "
        "step_size (0.1–0.5) and check energy, semiangle_cutoff, aberrations, scan step and rotation"
    )
    if options.on_divergence == "raise":
        raise EPIEDivergenceError(message)
    warnings.warn(message + "; the result is marked diverged=True and must not be used", stacklevel=3)
    return True


def _parameters(d: _EPIEData, options: EPIEOptions) -> dict[str, Any]:
    """Everything the run gave py4DSTEM beyond the EPIEResult's own fields (JSON-able)."""
    g = d.geometry
    return {
        "energy_eV": g.energy,
        "semiangle_cutoff_mrad": g.semiangle_cutoff,
        "rolloff_mrad": g.rolloff,
        "aberrations": dict(g.aberrations),
        "vacuum_probe": d.vacuum is not None,
        "scan_step_A": list(d.step),
        "angular_sampling_mrad": d.angular,
        "subsample": d.subsample,
        "explicit_positions": d.positions is not None,
        "positions_mask": d.positions_mask is not None,
        "device": options.device,
        "seed": int(options.seed),
        "reconstruct_kwargs": {k: v for k, v in options.reconstruct_kwargs.items() if jsonable(v)},
        "preprocess_kwargs": {k: v for k, v in options.preprocess_kwargs.items() if jsonable(v)},
    }


# ================================================================================================== run
def run_epie(
    data,
    geometry=None,
    *,
    options: EPIEOptions | None = None,
    positions: np.ndarray | None = None,
    rotation_deg: float | None = None,
    transpose: bool | None = None,
    scan_step: float | tuple[float, float] | None = None,
    angular_sampling: float | None = None,
    vacuum_probe_intensity=None,
    positions_mask: np.ndarray | None = None,
    **settings: Any,
) -> EPIEResult:
    """Reconstruct with py4DSTEM's ePIE (``SingleslicePtychography``, ``"GD"``, ``max_batch_size=1``).

    Parameters
    ----------
    data
        A deep-CDI reconstruction that has been preprocessed (its datacube, geometry, scan step, subsampling,
        rotation, transpose and vacuum probe are used), or a py4DSTEM DataCube / 4-D array (Rx, Ry, Qx, Qy) of
        counts with ``geometry``. The caller's datacube is never modified.
    geometry
        :class:`~py4dstem_deepcdi.ProbeGeometry` (energy eV, semi-angle mrad, aberrations Å/rad, rolloff mrad);
        default the reconstruction's.
    options
        :class:`EPIEOptions` (iterations, step size, fixed probe, seed, device, ...); default ``EPIEOptions()``.
    positions
        (J, 2) probe positions (Å, detector frame); default a reconstruction's measured or masked positions, else
        the raster scan from the scan step, rotated and transposed by py4DSTEM itself
        (``force_com_rotation``/``force_com_transpose``).
    rotation_deg, transpose
        Scan rotation (deg) and transpose (py4DSTEM's convention); default the reconstruction's, and for a bare
        datacube py4DSTEM's centre-of-mass estimate when None.
    scan_step
        Scan step (Å); default the reconstruction's or the datacube calibration.
    angular_sampling
        Detector pixel size of the data (mrad); default the reconstruction's or the datacube calibration.
    vacuum_probe_intensity
        Measured vacuum pattern (array/DataCube, the data's detector shape) defining the aperture; default the
        reconstruction's (or its model's, if it has the data's detector shape).
    positions_mask
        (Rx, Ry) bool: use only the patterns where True (py4DSTEM's ``positions_mask``; ``positions`` then holds
        the kept positions); default a reconstruction's.
    **settings
        Fields of :class:`EPIEOptions` that replace those of ``options``: ``num_iter`` (50), ``step_size`` (0.5),
        ``fix_probe`` (True), ``seed`` (0), ``device`` ("cpu"), ``progress`` (True), ``store_iterations`` (False),
        ``on_divergence`` ("raise"), ``preprocess_kwargs``, ``reconstruct_kwargs``.

    Raises
    ------
    TypeError
        An unknown setting.
    ValueError
        Invalid options, a datacube without ``geometry``, positions or vacuum pattern of the wrong shape, a
        non-square scan step without rotation and transpose, missing calibrations.
    RuntimeError
        A reconstruction that is not preprocessed; ``device="gpu"`` without CuPy.
    EPIEDivergenceError
        The run diverged (``on_divergence="raise"``).
    """
    options = EPIEOptions.build(options, **settings)
    d = _resolve_data(
        data, geometry, positions=positions, rotation_deg=rotation_deg, transpose=transpose, scan_step=scan_step,
        angular_sampling=angular_sampling, vacuum_probe_intensity=vacuum_probe_intensity,
        positions_mask=positions_mask,
    )
    ptycho, preprocess_s = _preprocessed_ptychography(d, options)
    positions_A, origin, used_rotation, used_transpose = _scan_frame(ptycho, d)
    time_s = _reconstruct(ptycho, options)

    obj = np.asarray(asnumpy(ptycho.object))
    errors = np.asarray(ptycho.error_iterations, dtype=np.float64)
    diverged = _check_divergence(errors, obj, options)
    positions_px = positions_A / np.asarray(ptycho.sampling) + origin
    lo = np.clip(np.ceil(positions_px.min(0) - POSITION_TOLERANCE_PX).astype(int), 0, None)
    hi = np.minimum(np.floor(positions_px.max(0) + POSITION_TOLERANCE_PX).astype(int) + 1, obj.shape)
    iterations = None
    if options.store_iterations:
        iterations = [np.asarray(asnumpy(o)).astype(np.complex64) for o in ptycho.object_iterations]
    return EPIEResult(
        phase=np.angle(obj[lo[0] : hi[0], lo[1] : hi[1]]).astype(np.float32),
        object=obj,
        sampling=(float(ptycho.sampling[0]), float(ptycho.sampling[1])),
        positions_A=positions_A,
        origin_px=origin,
        crop_origin_px=(int(lo[0]), int(lo[1])),
        error_history=errors,
        time_s=time_s,
        preprocess_s=preprocess_s,
        num_iter=options.num_iter,
        step_size=options.step_size,
        fix_probe=bool(options.fix_probe),
        rotation_deg=used_rotation,
        transpose=used_transpose,
        probe=np.asarray(asnumpy(ptycho.probe)),
        diverged=diverged,
        object_iterations=iterations,
        parameters=_parameters(d, options),
        ptychography=ptycho,
    )
