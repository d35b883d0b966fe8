"""Deep CDI against the iterative baseline: py4DSTEM's ePIE on the same data, probe and positions.

    result = run_epie(recon, num_iter=50)                     # py4DSTEM SingleslicePtychography as ePIE
    comparison = compare_with_epie(recon, ground_truth=ds)    # register, crop, FRC, scores, timings
    comparison.visualize(); comparison.save("comparison.h5"); comparison.summary()

ePIE is py4DSTEM's gradient-descent engine (``reconstruction_method="GD"``) with ``max_batch_size=1``: one shuffled
pass over all patterns per iteration with Maiden–Rodenburg updates. It runs on the raw patterns of the datacube
(py4DSTEM centres them itself), with the energy, semi-angle, aberrations, aperture roll-off (or the measured vacuum
probe), scan step, scan rotation and transpose of the deep-CDI reconstruction.

Geometry: every image is compared on the deep-CDI canvas grid. A point at ``x`` Å (detector frame, the frame of
``recon.positions``) is canvas pixel ``x / sampling + origin``; ePIE's object and the ground truth are mapped to it
through their own probe positions (exact, no fitting), then an optional sub-pixel registration (``frc.register_images``)
refines the ePIE image. The common field of view is the largest axis-aligned rectangle in which the deep-CDI
coverage is full, which lies inside both methods' scanned areas (convex hulls of the positions) and, if given, on
the ground truth.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend import asnumpy
from .planes import remove_plane

#: normalised ePIE error (py4DSTEM's: squared amplitude error over the mean pattern intensity) above which the
#: reconstruction has diverged: a sane one stays below ~1 (4 is the bound for any pair of equal-norm amplitudes)
EPIE_ERROR_LIMIT = 10.0
#: growth of the error from its minimum to the last iteration that counts as divergence
EPIE_ERROR_GROWTH = 100.0
#: smallest common field of view (pixels per side) worth comparing
MIN_FOV_PX = 8
KIND = "py4dstem-deepcdi comparison"


class EPIEDivergenceError(RuntimeError):
    """py4DSTEM's ePIE produced NaN or an exploding error: its image must not be used."""


# ================================================================================================== ePIE
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

    def to_pixels(self, points_A: np.ndarray) -> np.ndarray:
        """Object-pixel coordinates of points (..., 2) given in Å (detector frame, the frame of ``positions_A``)."""
        return np.asarray(points_A, dtype=np.float64) / np.asarray(self.sampling) + self.origin_px

    @property
    def ms_per_position_iteration(self) -> float:
        """Reconstruction time per probe position per iteration (ms)."""
        return 1e3 * self.time_s / max(len(self.positions_A) * max(self.num_iter, 1), 1)

    def summary(self) -> dict[str, Any]:
        """Numbers of the run (JSON-able)."""
        return _plain({
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
            "final_error": float(self.error_history[-1]) if len(self.error_history) else float("nan"),
            "diverged": self.diverged,
        })

    def __repr__(self) -> str:
        state = "DIVERGED, " if self.diverged else ""
        error = float(self.error_history[-1]) if len(self.error_history) else float("nan")
        return (
            f"EPIEResult({state}{self.num_iter} iterations on {len(self.positions_A)} positions in {self.time_s:.2f} s "
            f"({self.ms_per_position_iteration:.3g} ms/position/iteration), error {error:.3g}, "
            f"phase {self.phase.shape} "
            f"at {self.sampling[0]:.4g} Å/px)"
        )


def _is_reconstruction(obj) -> bool:
    from .reconstruction import DeepCDIReconstruction  # noqa: PLC0415

    return isinstance(obj, DeepCDIReconstruction)


def _subsample_of(recon) -> int:
    return int(getattr(recon, "_options", {}).get("subsample", 1) or 1)


def _recon_vacuum(recon, detector_shape: tuple[int, int]):
    """The vacuum probe to give ePIE for a reconstruction: the user's measured one, else the model's if it fits."""
    if recon.vacuum_probe_intensity is not None:
        return recon.vacuum_probe_intensity
    model_vacuum = recon.model.geometry.vacuum_probe_intensity
    if model_vacuum is not None and tuple(model_vacuum.shape) == tuple(detector_shape):
        return model_vacuum
    return None


def _gpu_error(exc: BaseException) -> RuntimeError:
    return RuntimeError(
        "device='gpu': py4DSTEM's ptychography needs CuPy (cupyx) and a CUDA GPU, and importing it failed "
        f"({exc}); install the CuPy wheel that matches your CUDA (e.g. `pip install cupy-cuda12x`) or use device='cpu'"
    )


def run_epie(
    data,
    geometry=None,
    *,
    num_iter: int = 50,
    fix_probe: bool = True,
    step_size: float = 0.5,
    positions: np.ndarray | None = None,
    rotation_deg: float | None = None,
    transpose: bool | None = None,
    scan_step: float | tuple[float, float] | None = None,
    angular_sampling: float | None = None,
    vacuum_probe_intensity=None,
    device: str = "cpu",
    progress: bool = True,
    seed: int = 0,
    store_iterations: bool = False,
    on_divergence: str = "raise",
    preprocess_kwargs: dict[str, Any] | None = None,
    reconstruct_kwargs: dict[str, Any] | None = None,
) -> EPIEResult:
    """Reconstruct with py4DSTEM's ePIE (``SingleslicePtychography``, ``"GD"``, ``max_batch_size=1``).

    Parameters
    ----------
    data
        A :class:`~py4dstem_deepcdi.DeepCDIReconstruction` that has been preprocessed (its datacube, geometry,
        scan step, subsampling, rotation, transpose and vacuum probe are used), or a py4DSTEM DataCube / 4-D array
        (Rx, Ry, Qx, Qy) of counts with ``geometry``. The caller's datacube is never modified.
    geometry
        :class:`~py4dstem_deepcdi.ProbeGeometry` (energy eV, semi-angle mrad, aberrations Å/rad, rolloff mrad);
        default the reconstruction's.
    num_iter
        ePIE iterations (one pass over all patterns each).
    fix_probe
        Keep the probe fixed (True) or update it too.
    step_size
        ePIE step size (object and probe), dimensionless; 0.1–1.
    positions
        (J, 2) probe positions (Å, detector frame); default the raster scan from the scan step, rotated and
        transposed by py4DSTEM itself (``force_com_rotation``/``force_com_transpose``).
    rotation_deg, transpose
        Scan rotation (deg) and transpose (py4DSTEM's convention); default the reconstruction's, and for a bare
        datacube py4DSTEM's centre-of-mass estimate when None.
    scan_step
        Scan step (Å); default the reconstruction's or the datacube calibration.
    angular_sampling
        Detector pixel size of the data (mrad); default the reconstruction's or the datacube calibration.
    vacuum_probe_intensity
        Measured vacuum pattern (array/DataCube, the data's detector shape) defining the aperture; default the
        reconstruction's.
    device
        ``"cpu"`` or ``"gpu"`` (py4DSTEM with CuPy).
    progress
        py4DSTEM's progress bar.
    seed
        Seed of ePIE's random pattern order.
    store_iterations
        Keep the complex object after every iteration (``EPIEResult.object_iterations``).
    on_divergence
        ``"raise"`` (:class:`EPIEDivergenceError`) or ``"warn"`` (return the result with ``diverged=True``).
    preprocess_kwargs, reconstruct_kwargs
        Extra arguments for py4DSTEM's ``preprocess``/``reconstruct`` (e.g. ``{"fix_probe_com": False}``).
    """
    import py4DSTEM  # noqa: PLC0415

    from .preprocessing import datacube_array, detector_sampling, real_space_step  # noqa: PLC0415
    from .probe import vacuum_pattern  # noqa: PLC0415
    from .scan import scan_positions  # noqa: PLC0415

    if on_divergence not in ("raise", "warn"):
        raise ValueError(f"on_divergence must be 'raise' or 'warn', got {on_divergence!r}")
    num_iter = int(num_iter)
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    preprocess_kwargs = dict(preprocess_kwargs or {})
    reconstruct_kwargs = dict(reconstruct_kwargs or {})

    if _is_reconstruction(data):
        recon = data
        if recon.data is None:
            raise RuntimeError("run_epie needs a preprocessed reconstruction: call recon.preprocess() first")
        raw = datacube_array(recon.datacube)
        subsample = _subsample_of(recon)
        geometry = geometry or recon.geometry
        # recon.data.scan_step is the step after subsampling, the step of the patterns ePIE gets
        step = tuple(float(s) for s in recon.data.scan_step) if scan_step is None else real_space_step(None, scan_step)
        angular = recon.data.data_angular_sampling if angular_sampling is None else float(angular_sampling)
        rotation_deg = recon.data.rotation_deg if rotation_deg is None else rotation_deg
        transpose = recon.data.transpose if transpose is None else transpose
        if vacuum_probe_intensity is None:
            vacuum_probe_intensity = _recon_vacuum(recon, raw.shape[2:])
    else:
        if geometry is None:
            raise ValueError(
                "run_epie on a datacube needs geometry= (a ProbeGeometry: energy, semi-angle, aberrations)"
            )
        raw = datacube_array(data)
        subsample = 1
        step = real_space_step(data, scan_step)
        angular = detector_sampling(data, geometry.wavelength, angular_sampling)

    view = raw[::subsample, ::subsample] if subsample > 1 else raw
    scan_shape = tuple(view.shape[:2])
    # py4DSTEM's reshaping (binning) replaces or rewrites the datacube it is given: hand it a private copy then
    reshaping = any(k in preprocess_kwargs for k in ("diffraction_intensities_shape", "in_place_datacube_modification"))
    array = np.array(view, dtype=np.float32, copy=True) if (reshaping or subsample > 1) else np.asarray(view)
    datacube = py4DSTEM.DataCube(data=array)  # a private DataCube: the caller's calibration and tree stay untouched
    datacube.calibration.set_R_pixel_size(float(step[0]))
    datacube.calibration.set_R_pixel_units("A")
    datacube.calibration.set_Q_pixel_size(float(angular))
    datacube.calibration.set_Q_pixel_units("mrad")

    if positions is None and abs(step[0] - step[1]) > 1e-9 * step[0]:
        if rotation_deg is None or transpose is None:
            raise ValueError("a non-square scan step needs rotation_deg and transpose (or explicit positions)")
        positions = scan_positions(scan_shape, step, float(rotation_deg), bool(transpose))
    explicit = positions is not None
    if explicit:
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != (scan_shape[0] * scan_shape[1], 2):
            expected = (scan_shape[0] * scan_shape[1], 2)
            raise ValueError(f"positions must have shape {expected} (Å), got {positions.shape}")

    vacuum = None
    if vacuum_probe_intensity is not None:
        vacuum = vacuum_pattern(vacuum_probe_intensity)
        if vacuum.shape != tuple(array.shape[2:]):
            raise ValueError(
                f"vacuum_probe_intensity has shape {vacuum.shape} but the data's patterns are "
                f"{tuple(array.shape[2:])}; "
                "give the vacuum pattern recorded with the same detector binning as the data"
            )

    kwargs = {
        "energy": geometry.energy,
        "datacube": datacube,
        "semiangle_cutoff": geometry.semiangle_cutoff,
        "rolloff": geometry.rolloff,
        "vacuum_probe_intensity": vacuum,
        "polar_parameters": dict(geometry.aberrations),  # py4DSTEM mutates the dict it is given
        "initial_scan_positions": positions if explicit else None,
        "object_type": "complex",
        "device": device,
        "verbose": False,
    }
    preprocess_args = {
        "plot_center_of_mass": False,
        "plot_rotation": False,
        "plot_probe_overlaps": False,
        "force_com_rotation": 0.0 if explicit else (None if rotation_deg is None else float(rotation_deg)),
        "force_com_transpose": False if explicit else (None if transpose is None else bool(transpose)),
        **preprocess_kwargs,
    }
    try:
        ptycho = py4DSTEM.process.phase.SingleslicePtychography(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            ptycho.preprocess(**preprocess_args)
            preprocess_s = time.perf_counter() - start
    except ModuleNotFoundError as exc:
        if "cup" in str(exc):
            raise _gpu_error(exc) from exc
        raise

    sampling = tuple(float(s) for s in ptycho.sampling)
    positions_px = np.asarray(asnumpy(ptycho._positions_px), dtype=np.float64)
    used_rotation = float(np.rad2deg(ptycho._rotation_best_rad)) if not explicit else 0.0
    used_transpose = bool(ptycho._rotation_best_transpose) if not explicit else False
    if explicit:
        positions_A = positions
        used_rotation = float(rotation_deg) if rotation_deg is not None else 0.0
        used_transpose = bool(transpose) if transpose is not None else False
    else:
        positions_A = scan_positions(scan_shape, step, used_rotation, used_transpose)
    origin = (positions_px - positions_A / np.asarray(sampling)).mean(0)
    residual = float(np.abs(positions_px - positions_A / np.asarray(sampling) - origin).max())
    if residual > 1e-3:
        raise RuntimeError(
            f"py4DSTEM placed the probe positions differently from this package's scan convention (residual "
            f"{residual:.3g} px): the rotation/transpose conventions disagree; please report this"
        )

    reconstruct_args = {
        "num_iter": num_iter,
        "reconstruction_method": "GD",
        "max_batch_size": 1,
        "step_size": float(step_size),
        "fix_probe": bool(fix_probe),
        "seed_random": int(seed),
        "progress_bar": bool(progress),
        "store_iterations": bool(store_iterations),
        "reset": True,
        **reconstruct_kwargs,
    }
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        start = time.perf_counter()
        ptycho.reconstruct(**reconstruct_args)
        time_s = time.perf_counter() - start

    obj = np.asarray(asnumpy(ptycho.object))
    errors = np.asarray(ptycho.error_iterations, dtype=np.float64)
    finite = bool(np.all(np.isfinite(errors)) and np.all(np.isfinite(obj)))
    exploded = finite and len(errors) > 0 and (
        errors.max() > EPIE_ERROR_LIMIT or errors[-1] > EPIE_ERROR_GROWTH * max(errors.min(), 1e-12)
    )
    diverged = bool((not finite) or exploded)
    if diverged:
        what = "NaN/infinite values" if not finite else f"an exploding error ({errors.min():.3g} → {errors.max():.3g})"
        message = (
            f"py4DSTEM's ePIE diverged after {len(errors)} iterations with step_size={step_size}: {what}. Lower "
            "step_size (0.1–0.5) and check energy, semiangle_cutoff, aberrations, scan step and rotation"
        )
        if on_divergence == "raise":
            raise EPIEDivergenceError(message)
        warnings.warn(message + "; the result is marked diverged=True and must not be used", stacklevel=2)

    lo = np.clip(np.ceil(positions_px.min(0)).astype(int), 0, None)
    hi = np.minimum(np.floor(positions_px.max(0)).astype(int) + 1, obj.shape)
    phase = np.angle(obj[lo[0] : hi[0], lo[1] : hi[1]]).astype(np.float32)
    iterations = None
    if store_iterations:
        iterations = [np.asarray(asnumpy(o)).astype(np.complex64) for o in ptycho.object_iterations]
    return EPIEResult(
        phase=phase,
        object=obj,
        sampling=sampling,
        positions_A=np.asarray(positions_A, dtype=np.float64),
        origin_px=origin,
        crop_origin_px=(int(lo[0]), int(lo[1])),
        error_history=errors,
        time_s=time_s,
        preprocess_s=preprocess_s,
        num_iter=num_iter,
        step_size=float(step_size),
        fix_probe=bool(fix_probe),
        rotation_deg=used_rotation,
        transpose=used_transpose,
        probe=np.asarray(asnumpy(ptycho.probe)),
        diverged=diverged,
        object_iterations=iterations,
        parameters={
            "energy_eV": geometry.energy,
            "semiangle_cutoff_mrad": geometry.semiangle_cutoff,
            "rolloff_mrad": geometry.rolloff,
            "aberrations": dict(geometry.aberrations),
            "vacuum_probe": vacuum is not None,
            "scan_step_A": list(step),
            "angular_sampling_mrad": float(angular),
            "subsample": subsample,
            "explicit_positions": explicit,
            "device": device,
            "seed": int(seed),
            "reconstruct_kwargs": {k: v for k, v in reconstruct_kwargs.items() if _jsonable(v)},
            "preprocess_kwargs": {k: v for k, v in preprocess_kwargs.items() if _jsonable(v)},
        },
    )


def _plain(value):
    """``value`` with numpy scalars/arrays turned into Python numbers/lists (JSON-able), recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


# ================================================================================================== image tools
def remove_background(image: np.ndarray, ramp: bool = False) -> np.ndarray:
    """``image`` minus its mean (``ramp=False``) or minus its least-squares plane ``a + b·i + c·j`` (rad)."""
    image = np.asarray(image, dtype=np.float64)
    return remove_plane(image) if ramp else image - image.mean()


def phase_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images of the same shape (offsets removed)."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def score_against_truth(image: np.ndarray, truth: np.ndarray, sampling: tuple[float, float]) -> dict[str, Any]:
    """Scores of a phase image (rad) against the ground truth on the same grid (``sampling`` Å).

    Returns ``correlation``; ``rms_rad``: RMS of ``truth - (a·image + b)`` after the least-squares scale and
    offset; ``phase_scale``: the image's contrast relative to the truth, ``cov(image, truth) / var(truth)``
    (1 = right scale, < 1 = too weak); ``frc``: the FRC with the truth (see :func:`image_frc`).
    """
    x = np.asarray(image, dtype=np.float64).ravel()
    t = np.asarray(truth, dtype=np.float64).ravel()
    design = np.stack([x, np.ones_like(x)], -1)
    coefficients, *_ = np.linalg.lstsq(design, t, rcond=None)
    rms = float(np.sqrt(np.mean((t - design @ coefficients) ** 2)))
    tc = t - t.mean()
    scale = float(((x - x.mean()) * tc).sum() / (tc * tc).sum()) if (tc * tc).sum() > 0 else float("nan")
    frc = image_frc(image, truth, sampling)
    return {
        "correlation": phase_correlation(image, truth),
        "rms_rad": rms,
        "phase_scale": scale,
        "resolution_A": frc["resolution_A"],
        "frc": frc,
    }


def image_frc(a: np.ndarray, b: np.ndarray, sampling: tuple[float, float] | float) -> dict[str, Any]:
    """Fourier ring correlation of two phase images on the same grid (``sampling`` Å/pixel).

    Uses :func:`py4dstem_deepcdi.frc.fourier_ring_correlation` (Tukey-apodised, means removed, no registration).
    Returns ``q`` (Å⁻¹, ring centres), ``frc`` (NaN on the DC ring), ``half_bit`` (threshold curve),
    ``n_per_ring`` and ``resolution_A`` = ``{"0.5": Å, "0.143": Å, "half_bit": Å}``, the first crossing of each
    threshold; NaN when the curve never falls below it up to Nyquist (resolution then ≤ 2 pixels).
    """
    from .frc import fourier_ring_correlation  # noqa: PLC0415

    result = fourier_ring_correlation(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), sampling)
    return {
        "q": np.asarray(result.q),
        "frc": np.asarray(result.frc),
        "half_bit": np.asarray(result.half_bit),
        "n_per_ring": np.asarray(result.n_per_ring),
        "resolution_A": {key: float(value) for key, value in result.resolutions.items()},
    }


def _largest_rectangle(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Largest axis-aligned rectangle of True pixels: (r0, r1, c0, c1), half-open; area 0 if none."""
    rows, cols = mask.shape
    heights = np.zeros(cols, dtype=np.int64)
    best = (0, (0, 0, 0, 0))
    for r in range(rows):
        heights = np.where(mask[r], heights + 1, 0)
        stack: list[int] = []
        for c in range(cols + 1):
            h = heights[c] if c < cols else 0
            while stack and heights[stack[-1]] >= h:
                top = stack.pop()
                height = int(heights[top])
                left = stack[-1] + 1 if stack else 0
                area = height * (c - left)
                # prefer the squarest of equal areas (a better FRC)
                squarer = min(height, c - left) > min(best[1][1] - best[1][0], best[1][3] - best[1][2])
                if area > best[0] or (area == best[0] and area > 0 and squarer):
                    best = (area, (r - height + 1, r + 1, left, c))
            stack.append(c)
    return best[1]


def _inside_hull(points: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Whether each grid point (M, 2) lies inside the convex hull of ``points`` (J, 2) (all in pixels)."""
    from scipy.spatial import Delaunay  # noqa: PLC0415
    from scipy.spatial import QhullError  # noqa: PLC0415

    try:
        return Delaunay(points).find_simplex(grid) >= 0
    except QhullError as exc:
        raise ValueError(
            "the probe positions are collinear (a one-line scan): no 2-D field of view to compare"
        ) from exc


def _sample(array: np.ndarray, coords: np.ndarray, order: int = 3) -> np.ndarray:
    """Values of a real or complex 2-D array at pixel coordinates (2, ...) by spline interpolation."""
    from scipy.ndimage import map_coordinates  # noqa: PLC0415

    if np.iscomplexobj(array):
        return map_coordinates(array.real, coords, order=order, mode="nearest") + 1j * map_coordinates(
            array.imag, coords, order=order, mode="nearest"
        )
    return map_coordinates(np.asarray(array, dtype=np.float64), coords, order=order, mode="nearest")


def _register(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Sub-pixel shift (pixels) such that ``moving(r + shift) ≈ reference(r)`` (``frc.register_images``)."""
    from .frc import register_images  # noqa: PLC0415

    # register_images: image_2(r) ≈ image_1(r - shift)  ⇔  moving(r + shift) ≈ reference(r)
    return np.asarray(register_images(reference, moving).shift, dtype=np.float64)


# ================================================================================================== ground truth
def _ground_truth(ground_truth, recon) -> tuple[np.ndarray, tuple[float, float], np.ndarray] | None:
    """(phase rad, sampling Å, delta Å): truth pixel of a point ``x`` Å of the reconstruction's frame is
    ``(x + delta) / sampling``."""
    if ground_truth is None:
        return None
    if all(hasattr(ground_truth, name) for name in ("phase", "sampling", "positions")):  # a SimulatedDataset
        phase, sampling, positions = ground_truth.phase, ground_truth.sampling, ground_truth.positions
    else:
        try:
            phase, sampling, positions = ground_truth
        except (TypeError, ValueError) as exc:
            raise TypeError(
                "ground_truth must be a SimulatedDataset or a tuple (phase rad, sampling Å, positions): positions "
                "(J, 2) Å in the truth's frame (same order as the reconstruction's) or a (2,) offset Å"
            ) from exc
    phase = np.asarray(phase, dtype=np.float64)
    if phase.ndim != 2:
        raise ValueError(f"the ground-truth phase must be a 2-D image, got shape {phase.shape}")
    sampling = (float(sampling), float(sampling)) if np.isscalar(sampling) else tuple(float(s) for s in sampling)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape == (2,):
        return phase, sampling, positions
    mine = recon.positions
    if len(positions) != len(mine):
        from .preprocessing import datacube_array  # noqa: PLC0415

        full = datacube_array(recon.datacube).shape[:2]
        s = _subsample_of(recon)
        if s > 1 and positions.shape == (full[0] * full[1], 2):
            positions = positions.reshape(*full, 2)[::s, ::s].reshape(-1, 2)
        else:
            raise ValueError(
                f"the ground truth has {len(positions)} positions but the reconstruction {len(mine)}; give the "
                "positions of the same scan (or a (2,) offset in Å)"
            )
    difference = positions - mine
    delta = difference.mean(0)
    residual = float(np.abs(difference - delta).max())
    if residual > 0.05 * min(sampling):
        raise ValueError(
            f"the ground-truth positions are not the reconstruction's positions shifted (residual {residual:.3g} Å): "
            "check the scan rotation/transpose and the position order"
        )
    return phase, sampling, delta


# ================================================================================================== virtual ADF
def virtual_adf(recon, inner_factor: float = 1.1) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Virtual annular dark-field image (scan shape, counts) of the reconstruction's datacube via py4DSTEM.

    Inner radius ``inner_factor`` × the bright-field radius (``semiangle_cutoff / data angular sampling``
    pixels), outer radius the detector edge, centred on the mean fitted bright-field-disk centre. Computed on a
    private DataCube (py4DSTEM stores virtual images in the datacube's tree). Returns ``(None, info)`` when the
    detector holds no dark field.
    """
    import py4DSTEM  # noqa: PLC0415

    from .preprocessing import datacube_array  # noqa: PLC0415

    raw = datacube_array(recon.datacube)
    s = _subsample_of(recon)
    view = raw[::s, ::s] if s > 1 else raw
    centre = recon.data.centre.reshape(-1, 2).mean(0)
    angular = recon.data.data_angular_sampling
    r_bf = recon.geometry.semiangle_cutoff / angular
    r_in = inner_factor * r_bf
    qx, qy = raw.shape[2:]
    r_out = float(min(centre[0], centre[1], qx - 1 - centre[0], qy - 1 - centre[1]))
    info = {
        "centre_px": centre.tolist(),
        "inner_px": r_in,
        "outer_px": r_out,
        "inner_mrad": r_in * angular,
        "outer_mrad": r_out * angular,
        "bright_field_px": r_bf,
    }
    if r_out <= r_in + 0.5:
        info["reason"] = "the detector ends at the bright-field disk: no dark-field signal"
        return None, info
    datacube = py4DSTEM.DataCube(data=np.asarray(view))
    image = datacube.get_virtual_image(
        mode="annulus", geometry=((float(centre[0]), float(centre[1])), (float(r_in), r_out)), verbose=False,
        name="deepcdi_adf",
    )
    return np.asarray(image.data, dtype=np.float64), info


# ================================================================================================== comparison
@dataclass
class Comparison:
    """Deep CDI against ePIE on the common field of view.

    Attributes
    ----------
    deep_phase, epie_phase
        Phase images (rad) on the deep-CDI grid over the common field of view, offset (and ramp) removed.
    truth_phase
        The ground truth on the same grid (or None).
    sampling
        Pixel size (Å) of the images.
    box
        The common field of view as deep-CDI canvas pixels ``(r0, r1, c0, c1)`` (half-open).
    frc
        ``image_frc(deep_phase, epie_phase)``: ``q`` (Å⁻¹), ``frc``, ``half_bit``, ``resolution_A``.
    correlation
        Pearson correlation of the two phase images.
    timings
        Seconds: ``deep_cdi_s`` (inference + stitching), ``deep_cdi_preprocess_s``, ``epie_s``, ``epie_preprocess_s``;
        ``epie_over_deep_cdi`` (speed ratio), ``positions``, ``epie_iterations``.
    registration
        ``shift_px`` (the sub-pixel shift of the ePIE image found by registration, canvas pixels), ``applied``.
    vs_truth
        ``{"deep_cdi": scores, "epie": scores}`` (see :func:`score_against_truth`), or None.
    epie_truth_correlation
        ePIE's correlation with the truth after every iteration (when stored), else None.
    epie_iterations_to_match
        First ePIE iteration whose correlation with the truth reaches deep CDI's (None: never, or not measured).
    adf, adf_info
        Virtual ADF image of the same datacube (scan frame) and its detector geometry.
    epie
        The :class:`EPIEResult`.
    remove_ramp
        Whether a linear ramp was removed from every image.
    """

    deep_phase: np.ndarray
    epie_phase: np.ndarray
    truth_phase: np.ndarray | None
    sampling: tuple[float, float]
    box: tuple[int, int, int, int]
    frc: dict[str, Any]
    correlation: float
    timings: dict[str, float]
    registration: dict[str, Any]
    vs_truth: dict[str, dict[str, Any]] | None
    epie_truth_correlation: list[float] | None
    epie_iterations_to_match: int | None
    adf: np.ndarray | None
    adf_info: dict[str, Any]
    epie: EPIEResult
    remove_ramp: bool
    scan_step: tuple[float, float] = (1.0, 1.0)
    figure: Any = None

    def _format_resolution(self, value: float) -> str:
        if math.isfinite(value):
            return f"{value:.3g} Å"
        return f"≤ {2 * max(self.sampling):.3g} Å (Nyquist: no crossing)"

    @property
    def resolution_A(self) -> dict[str, float]:
        """FRC resolutions (Å) between the two methods at the 0.5, 0.143 and half-bit thresholds."""
        return self.frc["resolution_A"]

    def summary(self) -> dict[str, Any]:
        """All numbers (JSON-able): resolutions Å, correlation, timings s, registration, scores against the truth."""
        out: dict[str, Any] = {
            "field_of_view_px": [self.deep_phase.shape[0], self.deep_phase.shape[1]],
            "field_of_view_A": [n * s for n, s in zip(self.deep_phase.shape, self.sampling)],
            "sampling_A": list(self.sampling),
            "frc_resolution_A": dict(self.resolution_A),
            "correlation": self.correlation,
            "remove_ramp": self.remove_ramp,
            "timings": dict(self.timings),
            "registration": dict(self.registration),
            "epie": self.epie.summary(),
        }
        if self.vs_truth is not None:
            out["vs_truth"] = {
                method: {k: v for k, v in scores.items() if k != "frc"} for method, scores in self.vs_truth.items()
            }
            out["epie_iterations_to_match"] = self.epie_iterations_to_match
        return _plain(out)

    def __repr__(self) -> str:
        r = self.resolution_A
        t = self.timings
        h, w = self.deep_phase.shape
        lines = [
            f"Comparison(deep CDI vs ePIE, {self.epie.num_iter} iterations; common field of view "
            f"{h}×{w} px = {h * self.sampling[0]:.1f}×{w * self.sampling[1]:.1f} Å"
            f"{', ramp removed' if self.remove_ramp else ''})",
            f"  FRC resolution: {self._format_resolution(r['0.5'])} (0.5), {self._format_resolution(r['0.143'])} "
            f"(0.143), {self._format_resolution(r['half_bit'])} (half-bit); phase correlation {self.correlation:.3f}",
            f"  time: deep CDI {t['deep_cdi_s']:.3g} s (inference + stitching), ePIE {t['epie_s']:.3g} s "
            f"({t['epie_over_deep_cdi']:.3g}× slower) for {t['positions']} positions",
            f"  registration shift {np.round(self.registration['shift_px'], 2).tolist()} px "
            f"({'applied' if self.registration['applied'] else 'not applied'})",
        ]
        if self.vs_truth is not None:
            for method, label in (("deep_cdi", "deep CDI"), ("epie", "ePIE")):
                s = self.vs_truth[method]
                lines.append(
                    f"  {label} vs truth: correlation {s['correlation']:.3f}, RMS {s['rms_rad']:.3g} rad, "
                    f"phase scale {s['phase_scale']:.3g}, "
                    f"FRC {self._format_resolution(s['resolution_A']['0.143'])} (0.143)"
                )
            if self.epie_truth_correlation is not None:
                match = self.epie_iterations_to_match
                lines.append(
                    f"  ePIE reaches deep CDI's correlation with the truth after "
                    f"{match if match is not None else f'more than {len(self.epie_truth_correlation)}'} iterations"
                )
        return "\n".join(lines)

    # ------------------------------------------------------------------ figure
    def visualize(
        self,
        inset: tuple[float, float, float] | None = None,
        cmap: str = "magma",
        figsize: tuple[float, float] | None = None,
        path: str | Path | None = None,
    ):
        """The paper's figure: both phase images (same colour scale), magnified views of the same region (boxes on
        the full images), the FRC with the 0.5/0.143/half-bit thresholds and the resolutions in Å, the virtual ADF.

        ``inset`` is ``(row Å, column Å, size Å)`` from the top-left of the common field of view (default: the
        central third). Returns the matplotlib Figure (also ``self.figure``; saved to ``path`` if given).
        """
        import matplotlib.pyplot as plt  # noqa: PLC0415
        from matplotlib.patches import Rectangle  # noqa: PLC0415

        images = [("deep CDI", self.deep_phase), (f"ePIE ({self.epie.num_iter} it.)", self.epie_phase)]
        if self.truth_phase is not None:
            images.append(("ground truth", self.truth_phase))
        columns = len(images) + 1
        fig, axes = plt.subplots(2, columns, figsize=figsize or (3.8 * columns + 1, 7.6), squeeze=False,
                                 layout="constrained")
        stack = np.concatenate([im.ravel() for _, im in images])
        vmin, vmax = np.percentile(stack, [0.5, 99.5])
        h, w = self.deep_phase.shape
        sy, sx = self.sampling
        extent = [0, w * sx, h * sy, 0]
        if inset is None:
            size_px = max(min(h, w) // 3, min(8, h, w))
            r0, c0 = (h - size_px) // 2, (w - size_px) // 2
        else:
            r0, c0, size_px = int(round(inset[0] / sy)), int(round(inset[1] / sx)), int(round(inset[2] / sy))
            if size_px < 2 or r0 < 0 or c0 < 0 or r0 + size_px > h or c0 + size_px > w:
                raise ValueError(f"inset {inset} (Å) does not fit in the {h * sy:.1f}×{w * sx:.1f} Å field of view")
        zoom_extent = [c0 * sx, (c0 + size_px) * sx, (r0 + size_px) * sy, r0 * sy]
        for k, (title, image) in enumerate(images):
            top, bottom = axes[0, k], axes[1, k]
            im = top.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent)
            top.add_patch(Rectangle((c0 * sx, r0 * sy), size_px * sx, size_px * sy, fill=False, ec="cyan", lw=1.2))
            top.set_title(title)
            top.set_xlabel("Å")
            zoom = image[r0 : r0 + size_px, c0 : c0 + size_px]
            bottom.imshow(zoom, cmap=cmap, vmin=vmin, vmax=vmax, extent=zoom_extent)
            for spine in bottom.spines.values():
                spine.set_edgecolor("cyan")
            bottom.set_title(f"{title}, magnified")
            bottom.set_xlabel("Å")
        fig.colorbar(im, ax=list(axes[0, : len(images)]), shrink=0.9, label="phase (rad)")

        ax = axes[0, -1]
        if self.adf is not None:
            step = self.scan_step
            ax.imshow(self.adf, cmap="gray", extent=[0, self.adf.shape[1] * step[1], self.adf.shape[0] * step[0], 0])
            ax.set_title(f"virtual ADF {self.adf_info['inner_mrad']:.0f}–{self.adf_info['outer_mrad']:.0f} mrad")
            ax.set_xlabel("Å (scan frame)")
        else:
            ax.text(0.5, 0.5, "no virtual ADF\n" + self.adf_info.get("reason", ""), ha="center", va="center", wrap=True)
            ax.set_axis_off()

        ax = axes[1, -1]
        frc = self.frc
        ax.plot(frc["q"], frc["frc"], color="k", label="deep CDI vs ePIE")
        if self.vs_truth is not None:
            for method, label, colour in (("deep_cdi", "deep CDI", "tab:blue"), ("epie", "ePIE", "tab:orange")):
                f = self.vs_truth[method]["frc"]
                ax.plot(f["q"], f["frc"], color=colour, lw=0.9, ls="--", label=f"{label} vs truth")
        ax.plot(frc["q"], frc["half_bit"], color="gray", ls=":", label="half-bit")
        for level, colour in ((0.5, "tab:red"), (0.143, "tab:green")):
            ax.axhline(level, color=colour, lw=0.8)
            resolution = frc["resolution_A"][f"{level:g}"]
            if math.isfinite(resolution) and resolution > 0:
                ax.axvline(1 / resolution, color=colour, lw=0.8, ls="--")
                ax.annotate(f"{resolution:.2f} Å", (1 / resolution, level), textcoords="offset points", xytext=(4, 4),
                            color=colour, fontsize=9)
        ax.text(
            0.03, 0.04,
            "\n".join(f"{name}: {self._format_resolution(frc['resolution_A'][key])}"
                      for key, name in (("0.5", "0.5"), ("0.143", "0.143"), ("half_bit", "half-bit"))),
            transform=ax.transAxes, fontsize=8, va="bottom",
        )
        ax.set_ylim(-0.2, 1.05)
        ax.set_xlim(0, float(np.max(frc["q"])))
        ax.set_xlabel("spatial frequency (Å⁻¹)")
        ax.set_ylabel("FRC")
        ax.set_title("Fourier ring correlation")
        ax.legend(fontsize=7, loc="upper right")
        t = self.timings
        fig.suptitle(
            f"deep CDI {t['deep_cdi_s']:.2f} s vs ePIE {t['epie_s']:.2f} s ({self.epie.num_iter} it.); "
            f"phase correlation {self.correlation:.3f}; "
            f"FRC resolution {self._format_resolution(self.resolution_A['0.5'])} (0.5), "
            f"{self._format_resolution(self.resolution_A['0.143'])} (0.143)",
            fontsize=10,
        )
        self.figure = fig
        if path is not None:
            from .io import atomic_path  # noqa: PLC0415

            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=150, format=Path(path).suffix.lstrip(".") or "png")
        return fig

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write an EMD 1.0 file: the deep-CDI phase (root image, rad), the ePIE/truth images, FRC curves, ADF and
        ePIE error history as child arrays, every number and timing as metadata. Atomic; an existing file is kept
        unless ``overwrite``. Read it back with :func:`read_comparison`."""
        from .io import save_result  # noqa: PLC0415

        arrays: dict[str, np.ndarray] = {
            "epie_phase_rad": self.epie_phase,
            "frc_q_per_A": np.asarray(self.frc["q"]),
            "frc": np.asarray(self.frc["frc"]),
            "frc_half_bit": np.asarray(self.frc["half_bit"]),
            "epie_error": np.asarray(self.epie.error_history),
        }
        if self.truth_phase is not None:
            arrays["truth_phase_rad"] = self.truth_phase
            for method in ("deep_cdi", "epie"):
                f = self.vs_truth[method]["frc"]
                arrays[f"frc_truth_{method}_q_per_A"] = np.asarray(f["q"])
                arrays[f"frc_truth_{method}"] = np.asarray(f["frc"])
        if self.epie_truth_correlation is not None:
            arrays["epie_truth_correlation"] = np.asarray(self.epie_truth_correlation)
        if self.adf is not None:
            arrays["adf"] = self.adf
        metadata = {
            "kind": KIND,
            "summary": self.summary(),
            "box_px": list(self.box),
            "adf_info": self.adf_info,
            "scan_step_A": list(self.scan_step),
            "epie_parameters": self.epie.parameters,
        }
        return save_result(path, self.deep_phase, metadata, arrays, overwrite=overwrite)


def read_comparison(path: str | Path) -> dict[str, Any]:
    """Read a file written by :meth:`Comparison.save`: ``deep_phase`` (rad), ``sampling`` (Å), ``summary``,
    ``metadata`` and every stored array by name."""
    from .io import read_result  # noqa: PLC0415

    phase, metadata, arrays = read_result(path)
    if metadata.get("kind") != KIND:
        raise ValueError(f"{path} holds a py4dstem-deepcdi result of kind {metadata.get('kind')!r}, not a comparison")
    summary = metadata["summary"]
    return {
        "deep_phase": phase,
        "sampling": tuple(summary["sampling_A"]),
        "summary": summary,
        "metadata": metadata,
        **arrays,
    }


def _deep_cdi_field_of_view(recon, min_coverage: float):
    """Canvas pixels of a reconstruction that are inside the scan and covered at >= ``min_coverage`` of the
    typical (90th percentile) coverage: (sampling Å, origin px, grid px (M, 2), grid Å (M, 2), ok (M,))."""
    s_d = np.asarray(recon.sampling, dtype=np.float64)
    origin_d = (recon.positions_px - recon.positions / s_d).mean(0)
    height, width = recon.object_phase.shape
    grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1)
    grid = grid.reshape(-1, 2).astype(np.float64)
    grid_A = (grid - origin_d) * s_d
    coverage = np.asarray(recon.coverage, dtype=np.float64).ravel()
    finite = np.isfinite(recon.object_phase).ravel()
    ok = _inside_hull(recon.positions_px, grid) & finite
    if ok.any():
        ok &= coverage >= min_coverage * np.percentile(coverage[ok], 90)
    r0, r1, c0, c1 = _largest_rectangle(ok.reshape(height, width))
    if min(r1 - r0, c1 - c0) < MIN_FOV_PX:
        raise ValueError(
            f"the deep-CDI field of view is too small to compare: {int(ok.sum())} pixels covered at >= "
            f"{min_coverage:g} of the typical coverage and no {MIN_FOV_PX}×{MIN_FOV_PX} pixel rectangle; "
            "scan a larger area or lower min_coverage"
        )
    return s_d, origin_d, grid, grid_A, ok


def score_reconstruction(recon, ground_truth, remove_ramp: bool = False, min_coverage: float = 0.5) -> dict[str, Any]:
    """Score a finished deep-CDI reconstruction against the ground truth, without ePIE.

    ``ground_truth`` as in :func:`compare_with_epie`. The truth is interpolated onto the reconstruction's canvas
    through the probe positions (no fitting), both are cropped to the largest well-covered rectangle, offsets (and
    with ``remove_ramp`` linear ramps) removed. Returns :func:`score_against_truth`'s numbers plus ``box``.
    """
    if recon.object_phase is None:
        raise RuntimeError("call recon.preprocess().reconstruct() first")
    t_phase, t_sampling, t_delta = _ground_truth(ground_truth, recon)
    s_d, _, grid, grid_A, ok = _deep_cdi_field_of_view(recon, min_coverage)
    t_px = (grid_A + t_delta) / np.asarray(t_sampling)
    ok &= np.all((t_px >= 0) & (t_px <= np.asarray(t_phase.shape) - 1), axis=1)
    height, width = recon.object_phase.shape
    r0, r1, c0, c1 = _largest_rectangle(ok.reshape(height, width))
    if min(r1 - r0, c1 - c0) < MIN_FOV_PX:
        raise ValueError("the reconstruction and the ground truth share no usable field of view")
    coords = np.moveaxis(t_px.reshape(height, width, 2)[r0:r1, c0:c1], -1, 0)
    truth = remove_background(_sample(t_phase, coords), remove_ramp)
    deep = remove_background(recon.object_phase[r0:r1, c0:c1], remove_ramp)
    sampling = (float(s_d[0]), float(s_d[1]))
    return {**score_against_truth(deep, truth, sampling), "box": (int(r0), int(r1), int(c0), int(c1))}


def compare_with_epie(
    recon,
    num_iter: int = 50,
    fix_probe: bool = True,
    remove_ramp: bool = False,
    epie_kwargs: dict[str, Any] | None = None,
    *,
    epie: EPIEResult | None = None,
    ground_truth=None,
    register: bool = True,
    max_shift_px: float = 2.0,
    min_coverage: float = 0.5,
    adf: bool = True,
    progress: bool | None = None,
) -> Comparison:
    """Compare a finished deep-CDI reconstruction with py4DSTEM's ePIE on the same data, probe and positions.

    Parameters
    ----------
    recon
        A :class:`~py4dstem_deepcdi.DeepCDIReconstruction` after ``preprocess().reconstruct()``.
    num_iter
        ePIE iterations.
    fix_probe
        Keep ePIE's probe fixed.
    remove_ramp
        Remove a least-squares linear ramp (rad/pixel) from every image, not only its mean.
    epie_kwargs
        More arguments for :func:`run_epie` (``step_size``, ``seed``, ``vacuum_probe_intensity``,
        ``store_iterations``, ``reconstruct_kwargs``, ...).
    epie
        A finished :class:`EPIEResult` to use instead of running ePIE.
    ground_truth
        A :class:`~py4dstem_deepcdi.SimulatedDataset`, or ``(phase rad, sampling Å, positions)`` with positions
        (J, 2) Å in the truth's frame (the reconstruction's scan order) or a (2,) offset Å between the frames.
        Both methods are then scored against it.
    register
        Refine the alignment of the ePIE image by sub-pixel registration (``frc.register_images``).
    max_shift_px
        Largest registration shift (deep-CDI pixels) accepted; a larger one is reported and not applied.
    min_coverage
        The common field of view keeps pixels whose deep-CDI coverage (summed patch weights) is at least this
        fraction of the scan's typical (90th percentile) coverage: 0.5 keeps the scanned area (edge pixels are
        covered by about half the patches of the interior), larger values trim a band along its edges.
    adf
        Compute a virtual ADF image of the datacube for the figure.
    progress
        Progress bars (default: the reconstruction's ``verbose``).
    """
    if not _is_reconstruction(recon):
        raise TypeError(f"compare_with_epie needs a DeepCDIReconstruction, got {type(recon).__name__}")
    if recon.object_phase is None:
        raise RuntimeError(
            "compare_with_epie needs a finished deep-CDI reconstruction: call recon.preprocess().reconstruct() first"
        )
    progress = recon.verbose if progress is None else progress
    truth = _ground_truth(ground_truth, recon)
    if epie is None:
        kwargs = {"device": recon.device, "progress": progress, **(epie_kwargs or {})}
        if truth is not None:
            kwargs.setdefault("store_iterations", True)
        epie = run_epie(recon, num_iter=num_iter, fix_probe=fix_probe, **kwargs)
    elif epie.diverged:
        raise EPIEDivergenceError("this ePIE result diverged (diverged=True): it cannot be compared")

    # ---------------------------------------------------------------- common field of view on the canvas grid
    s_d, origin_d, grid, grid_A, ok = _deep_cdi_field_of_view(recon, min_coverage)
    height, width = recon.object_phase.shape
    ok &= _inside_hull(epie.positions_A / s_d + origin_d, grid)
    e_px = epie.to_pixels(grid_A)
    ok &= np.all((e_px >= 0) & (e_px <= np.asarray(epie.object.shape) - 1), axis=1)
    if truth is not None:
        t_phase, t_sampling, t_delta = truth
        t_px = (grid_A + t_delta) / np.asarray(t_sampling)
        ok &= np.all((t_px >= 0) & (t_px <= np.asarray(t_phase.shape) - 1), axis=1)
    r0, r1, c0, c1 = _largest_rectangle(ok.reshape(height, width))
    if min(r1 - r0, c1 - c0) < MIN_FOV_PX:
        raise ValueError(
            "the fields of view do not overlap: deep CDI (full coverage), ePIE"
            f"{' and the ground truth' if truth else ''} share {int(ok.sum())} pixels, and no "
            f"{MIN_FOV_PX}×{MIN_FOV_PX} pixel rectangle; check that both methods used the same scan positions "
            "(and the ground truth's positions)"
        )
    box = (int(r0), int(r1), int(c0), int(c1))
    box_A = (grid.reshape(height, width, 2)[r0:r1, c0:c1] - origin_d) * s_d  # (h, w, 2) Å
    deep = np.asarray(recon.object_phase[r0:r1, c0:c1], dtype=np.float64)

    def epie_image(obj: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
        coords = epie.to_pixels(box_A) + shift_px * s_d / np.asarray(epie.sampling)
        return np.angle(_sample(obj, np.moveaxis(coords, -1, 0)))

    # ---------------------------------------------------------------- registration
    shift = np.zeros(2)
    unregistered = raw_epie = epie_image(epie.object, shift)
    registration = {"shift_px": [0.0, 0.0], "applied": False, "max_shift_px": max_shift_px}
    if register:
        found = np.asarray(_register(remove_background(deep, remove_ramp), remove_background(raw_epie, remove_ramp)))
        registration["shift_px"] = found.tolist()
        if np.all(np.isfinite(found)) and np.hypot(*found) <= max_shift_px:
            shift = found
            registration["applied"] = True
            raw_epie = epie_image(epie.object, shift)
        else:
            warnings.warn(
                f"registration of the ePIE image found a shift of {np.round(found, 2).tolist()} px (> max_shift_px="
                f"{max_shift_px}); kept the alignment given by the probe positions. The images may disagree "
                "(an untrained or mismatched model?)",
                stacklevel=2,
            )

    deep_phase = remove_background(deep, remove_ramp)
    epie_phase = remove_background(raw_epie, remove_ramp)
    sampling = (float(s_d[0]), float(s_d[1]))
    frc = image_frc(deep_phase, epie_phase, sampling)

    vs_truth = None
    truth_phase = None
    epie_truth_correlation = None
    match = None
    if truth is not None:
        t_px = (box_A + t_delta) / np.asarray(t_sampling)
        truth_phase = remove_background(_sample(t_phase, np.moveaxis(t_px, -1, 0)), remove_ramp)
        # each method is scored where its own probe positions put it: the registration shift (deep CDI vs ePIE)
        # is not applied here, so an offset of either image costs it
        vs_truth = {
            "deep_cdi": score_against_truth(deep_phase, truth_phase, sampling),
            "epie": score_against_truth(remove_background(unregistered, remove_ramp), truth_phase, sampling),
        }
        if epie.object_iterations:
            epie_truth_correlation = [
                phase_correlation(remove_background(epie_image(o, np.zeros(2)), remove_ramp), truth_phase)
                for o in epie.object_iterations
            ]
            target = vs_truth["deep_cdi"]["correlation"]
            match = next((k + 1 for k, c in enumerate(epie_truth_correlation) if c >= target), None)

    adf_image, adf_info = virtual_adf(recon) if adf else (None, {"reason": "not computed (adf=False)"})
    deep_s = float(recon.timings.get("inference_s", float("nan")) + recon.timings.get("stitching_s", float("nan")))
    timings = {
        "deep_cdi_s": deep_s,
        "deep_cdi_inference_s": float(recon.timings.get("inference_s", float("nan"))),
        "deep_cdi_stitching_s": float(recon.timings.get("stitching_s", float("nan"))),
        "deep_cdi_preprocess_s": float(recon.timings.get("preprocess_s", float("nan"))),
        "epie_s": epie.time_s,
        "epie_preprocess_s": epie.preprocess_s,
        "epie_over_deep_cdi": epie.time_s / deep_s if deep_s > 0 else float("nan"),
        "positions": int(len(recon.positions)),
        "epie_iterations": int(epie.num_iter),
    }
    return Comparison(
        deep_phase=deep_phase.astype(np.float32),
        epie_phase=epie_phase.astype(np.float32),
        truth_phase=None if truth_phase is None else truth_phase.astype(np.float32),
        sampling=sampling,
        box=box,
        frc=frc,
        correlation=phase_correlation(deep_phase, epie_phase),
        timings=timings,
        registration=registration,
        vs_truth=vs_truth,
        epie_truth_correlation=epie_truth_correlation,
        epie_iterations_to_match=match,
        adf=adf_image,
        adf_info=adf_info,
        epie=epie,
        remove_ramp=bool(remove_ramp),
        scan_step=tuple(float(s) for s in recon.data.scan_step),
    )
