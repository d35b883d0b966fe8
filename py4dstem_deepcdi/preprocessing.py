"""Experimental DataCube → network input: calibration, resampling, centring, normalisation, positions.

Never modifies the user's datacube: every step reads from it and writes new arrays.

1. Calibrations: real-space step (Å) and detector pixel (mrad, or Å⁻¹ converted with λ) from the DataCube or the
   arguments; a missing one is refused with the call that sets it.
2. Centre: the bright-field disk's centre of mass in every pattern, fitted by a plane over the scan (descan), so
   that object-induced deflections (the signal) are kept and only the instrument's shift is removed.
3. Resampling: each pattern is integrated over the model's detector pixels (area-weighted, counts conserved),
   centred on the fitted disk centre with sub-pixel precision: any angular sampling ≥ the data's range works.
4. Normalisation: ``encoding.network_input`` with the mean electrons per pattern of the dataset; for a pooled
   network also the sum of each position's 3×3 scan neighbourhood (``encoding.neighbour_sum``), normalised by the
   electrons of the patterns summed.
5. Positions: the raster scan × step, rotated/transposed like py4DSTEM (rotation from the user or estimated with
   py4DSTEM's centre-of-mass (DPC) method), optionally every n-th position.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import py4DSTEM
import torch

from .encoding import neighbour_sum, network_input
from .planes import fit_plane
from .probe import ProbeGeometry, vacuum_pattern
from .scan import neighbour_offsets, scan_positions

_LENGTH_UNITS = {"A": 1.0, "Å": 1.0, "nm": 10.0, "pm": 0.01}


@dataclass
class PreprocessedData:
    """Network-ready data.

    Attributes: ``amplitudes`` (J, N, N) float32 network input; ``positions`` (J, 2) probe positions in Å in the
    detector frame; ``scan_shape`` (Rx, Ry) after subsampling; ``scan_step`` (Å, after subsampling);
    ``electrons_per_pattern`` (mean counts per resampled pattern); ``centre`` (Rx, Ry, 2) fitted disk centres in
    data pixels; ``rotation_deg``, ``transpose``; ``data_angular_sampling`` (mrad/pixel of the input);
    ``mean_pattern`` (N, N) mean resampled counts; for a pooled network (``pool=3``) ``pooled`` (J, N, N), the
    normalised amplitudes of each position's summed 3×3 neighbourhood, and ``neighbour_offsets`` (9, 2) Å.
    """

    amplitudes: np.ndarray
    positions: np.ndarray
    scan_shape: tuple[int, int]
    scan_step: tuple[float, float]
    electrons_per_pattern: float
    centre: np.ndarray
    rotation_deg: float
    transpose: bool
    data_angular_sampling: float
    mean_pattern: np.ndarray
    pooled: np.ndarray | None = None
    neighbour_offsets: np.ndarray | None = None


def datacube_array(datacube) -> np.ndarray:
    """The 4-D (Rx, Ry, Qx, Qy) array of a py4DSTEM DataCube or array, with clear errors for other shapes."""
    data = datacube if isinstance(datacube, np.ndarray) else getattr(datacube, "data", datacube)
    if not hasattr(data, "shape") or len(data.shape) != 4:
        shape = getattr(data, "shape", None)
        got = f"shape {shape}" if shape is not None else type(data).__name__
        raise ValueError(
            f"expected a 4-D datacube (Rx, Ry, Qx, Qy), got {got}; "
            "a 3-D stack must be reshaped to its scan shape first "
            "(py4DSTEM.DataCube(data=array.reshape(Rx, Ry, Qx, Qy)))"
        )
    if data.shape[0] * data.shape[1] < 2:
        raise ValueError(
            f"the scan has {data.shape[0] * data.shape[1]} position(s); deep CDI needs overlapping positions"
        )
    return data


def real_space_step(datacube, scan_step: float | tuple[float, float] | None) -> tuple[float, float]:
    """Scan step (Å) from the argument or the DataCube's R calibration."""
    if scan_step is not None:
        step = (scan_step, scan_step) if np.isscalar(scan_step) else tuple(scan_step)
    else:
        calibration = getattr(datacube, "calibration", None)
        units = calibration.get_R_pixel_units() if calibration is not None else "pixels"
        if units not in _LENGTH_UNITS:
            raise ValueError(
                "missing real-space calibration: the datacube's scan step is in "
                f"{units!r}; pass scan_step=... (Å) or set datacube.calibration.set_R_pixel_size(step) and "
                "datacube.calibration.set_R_pixel_units('A')"
            )
        step = (calibration.get_R_pixel_size() * _LENGTH_UNITS[units],) * 2
    if not all(math.isfinite(s) and s > 0 for s in step):
        raise ValueError(f"scan_step must be positive (Å), got {step}")
    return (float(step[0]), float(step[1]))


def detector_sampling(datacube, wavelength: float, angular_sampling: float | None) -> float:
    """Detector pixel size (mrad) from the argument or the DataCube's Q calibration (mrad or Å⁻¹)."""
    if angular_sampling is not None:
        value = float(angular_sampling)
    else:
        calibration = getattr(datacube, "calibration", None)
        units = calibration.get_Q_pixel_units() if calibration is not None else "pixels"
        size = calibration.get_Q_pixel_size() if calibration is not None else None
        if units == "mrad":
            value = float(size)
        elif units == "A^-1":
            value = float(size) * wavelength * 1e3
        else:
            raise ValueError(
                f"missing diffraction calibration: the detector pixel is in {units!r}; pass angular_sampling=... "
                "(mrad) or set datacube.calibration.set_Q_pixel_size(...) with set_Q_pixel_units('mrad' or 'A^-1')"
            )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"the detector pixel size must be positive (mrad), got {value}")
    return value


def centres_of_mass(patterns: np.ndarray) -> np.ndarray:
    """Centres of mass (..., 2) of patterns (..., Qx, Qy) in pixels (row, col), computed in float64."""
    patterns = np.asarray(patterns, dtype=np.float64)
    total = patterns.sum((-2, -1))
    if np.any(total <= 0):
        raise ValueError("some diffraction patterns hold no counts; remove or mask those scan positions")
    q0 = np.arange(patterns.shape[-2], dtype=np.float64)
    q1 = np.arange(patterns.shape[-1], dtype=np.float64)
    return np.stack([patterns.sum(-1) @ q0 / total, patterns.sum(-2) @ q1 / total], -1)


def fit_disk_centres(data: np.ndarray, chunk_rows: int = 16) -> np.ndarray:
    """Centres of mass (Rx, Ry, 2) of every pattern, fitted by a plane over the scan (data pixels)."""
    rx, ry = data.shape[:2]
    com = np.empty((rx, ry, 2))
    for start in range(0, rx, chunk_rows):
        com[start : start + chunk_rows] = centres_of_mass(data[start : start + chunk_rows])
    return fit_plane(com)


def _overlap_weights(centres: torch.Tensor, n: int, q: int, ratio: float) -> torch.Tensor:
    """(B, n, q) overlap lengths of model pixel i (width ``ratio`` data px, pixel n//2 centred on ``centres``)
    with data pixel a (the box [a − ½, a + ½])."""
    edges = (torch.arange(n, dtype=torch.float64) - n // 2 - 0.5) * ratio
    lo = centres[:, None] + edges[None]  # (B, n)
    hi = lo + ratio
    a = torch.arange(q, dtype=torch.float64)
    return (torch.minimum(hi[..., None], a + 0.5) - torch.maximum(lo[..., None], a - 0.5)).clamp_min(0)


def resample_patterns(
    patterns: torch.Tensor, centres: torch.Tensor, data_sampling: float, geometry: ProbeGeometry
) -> torch.Tensor:
    """Integrate patterns (B, Qx, Qy) over the model's detector pixels, model pixel N//2 centred on ``centres``.

    Exact area weighting of the data pixels (boxes) by each model pixel, separable along the two axes: counts are
    conserved, identical geometries with an integer centre are reproduced exactly, and a sub-pixel centre shifts the
    pattern by linear interpolation.
    """
    _, qx, qy = patterns.shape
    n0, n1 = geometry.detector_shape
    ratio = geometry.angular_sampling / data_sampling  # model pixel in data pixels
    centres = centres.to(torch.float64)
    w0 = _overlap_weights(centres[:, 0], n0, qx, ratio).to(patterns.dtype)
    w1 = _overlap_weights(centres[:, 1], n1, qy, ratio).to(patterns.dtype)
    return w0 @ patterns @ w1.transpose(1, 2)


def resample_vacuum(vacuum_probe_intensity, angular_sampling: float, geometry: ProbeGeometry) -> np.ndarray:
    """A measured vacuum pattern on any detector, resampled onto the model's detector (sum 1).

    Parameters
    ----------
    vacuum_probe_intensity
        The vacuum diffraction pattern (2-D array, DiffractionSlice, or a DataCube whose mean pattern is used).
    angular_sampling
        Its detector pixel size (mrad).
    geometry
        The model's geometry: its detector shape and angular sampling; the bright-field disk's centre of mass lands
        on pixel (N0 // 2, N1 // 2), as :func:`preprocess` centres the data.
    """
    data = vacuum_pattern(vacuum_probe_intensity)
    if not (math.isfinite(angular_sampling) and angular_sampling > 0):
        raise ValueError(f"angular_sampling of the vacuum pattern must be positive (mrad), got {angular_sampling!r}")
    if not np.all(np.isfinite(data)) or data.min() < 0 or data.sum() <= 0:
        raise ValueError("the vacuum pattern must be finite, non-negative and hold counts")
    total = data.sum()
    centre = torch.from_numpy(centres_of_mass(data[None]))
    out = resample_patterns(torch.from_numpy(data[None]), centre, angular_sampling, geometry)[0].numpy()
    if out.sum() < 0.99 * total:
        raise ValueError(
            f"the model's detector ({geometry.detector_shape[0]}×{geometry.detector_shape[1]} pixels of "
            f"{geometry.angular_sampling:g} mrad) catches only {out.sum() / total:.0%} of the vacuum pattern's counts; "
            "check angular_sampling (mrad per pixel of the vacuum pattern)"
        )
    return out / out.sum()


def estimate_rotation(datacube, energy: float) -> tuple[float, bool]:
    """Scan rotation (deg) and transpose from py4DSTEM's centre-of-mass (DPC) curl minimisation."""
    dpc = py4DSTEM.process.phase.DPC(datacube=datacube, energy=energy, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dpc.preprocess(plot_center_of_mass=False, plot_rotation=False)
    return float(np.rad2deg(dpc._rotation_best_rad)), bool(dpc._rotation_best_transpose)


def preprocess(
    datacube,
    geometry: ProbeGeometry,
    *,
    scan_step: float | tuple[float, float] | None = None,
    angular_sampling: float | None = None,
    rotation_deg: float | None = None,
    transpose: bool | None = None,
    subsample: int = 1,
    centre: bool = True,
    chunk_rows: int = 16,
    pool: int = 1,
) -> PreprocessedData:
    """Turn a DataCube (or a 4-D array with ``scan_step`` and ``angular_sampling``) into network input.

    Parameters
    ----------
    datacube
        py4DSTEM DataCube (Rx, Ry, Qx, Qy) in counts, or a 4-D array.
    geometry
        The model's geometry: patterns are resampled to its detector shape and angular sampling.
    scan_step
        Scan step (Å); default from the DataCube's R calibration.
    angular_sampling
        Detector pixel size of the data (mrad); default from the DataCube's Q calibration.
    rotation_deg, transpose
        Rotation (deg) and transpose between scan and detector axes, py4DSTEM's convention; estimated with
        py4DSTEM's centre-of-mass method when None.
    subsample
        Use every n-th scan position along both axes (n × the step).
    centre
        Fit and remove the descan of the bright-field disk (True) or assume it sits at the detector's centre.
    chunk_rows
        Scan rows processed at a time (bounds memory for large datacubes).
    pool
        3 for a pooled network: also sum each position's 3×3 scan neighbourhood (``pooled``); 1 (default) not.
    """
    data = datacube_array(datacube)
    if pool not in (1, 3):
        raise ValueError(f"pool must be 1 (one pattern) or 3 (3×3 neighbourhoods), got {pool!r}")
    subsample = int(subsample)
    if subsample < 1:
        raise ValueError(f"subsample must be a positive integer, got {subsample}")
    step = real_space_step(datacube, scan_step)
    data_sampling = detector_sampling(datacube, geometry.wavelength, angular_sampling)
    rx, ry, qx, qy = data.shape
    n0, n1 = geometry.detector_shape
    if centre:
        centres = fit_disk_centres(data, chunk_rows)
    else:
        centres = np.broadcast_to(np.array([qx // 2, qy // 2], float), (rx, ry, 2)).copy()
    # the model's detector, in data pixels, must lie on the data's detector (one data pixel of slack at the edge)
    ratio = geometry.angular_sampling / data_sampling
    shape = np.array(geometry.detector_shape)
    lowest, highest = centres.reshape(-1, 2).min(0), centres.reshape(-1, 2).max(0)
    low = lowest - (shape // 2 + 0.5) * ratio
    high = highest + (shape - shape // 2 - 0.5) * ratio
    if np.any(low < -1.5) or np.any(high > np.array([qx, qy]) + 0.5):
        reach = min(float(np.min(lowest + 0.5)), float(np.min(np.array([qx, qy]) - 0.5 - highest)))
        raise ValueError(
            f"the datacube's detector reaches only ±{reach * data_sampling:.1f} mrad around the bright-field disk, "
            f"but the model needs ±{shape.max() * geometry.angular_sampling / 2:.1f} mrad ({n0}×{n1} pixels of "
            f"{geometry.angular_sampling:g} mrad); record with a shorter camera length or use a model trained for "
            "a smaller angular range"
        )

    centres = centres[::subsample, ::subsample]
    data_view = data[::subsample, ::subsample]
    sx, sy = data_view.shape[:2]
    if sx * sy < 2:
        raise ValueError(f"subsample={subsample} leaves {sx * sy} scan position(s); use a smaller subsample")
    counts = np.empty((sx * sy, n0, n1), dtype=np.float32)
    for start in range(0, sx, chunk_rows):
        block = np.asarray(data_view[start : start + chunk_rows], dtype=np.float32)
        if not np.all(np.isfinite(block)):
            raise ValueError("the datacube holds NaN or infinite values; clean or mask them before reconstructing")
        if block.min() < -1e-3 * max(float(block.max()), 1.0):
            raise ValueError(
                f"the datacube holds negative counts (min {block.min():.3g}); subtract the dark reference without "
                "going below zero (or clip) before reconstructing"
            )
        rows = len(block)
        patterns = torch.from_numpy(block.reshape(-1, qx, qy).clip(min=0))
        c = torch.from_numpy(centres[start : start + rows].reshape(-1, 2))
        out = resample_patterns(patterns, c, data_sampling, geometry)
        counts[start * sy : (start + rows) * sy] = out.numpy()
    electrons = float(counts.sum((-2, -1)).mean())
    pooled = None
    if pool > 1:
        summed, patterns = neighbour_sum(counts.reshape(sx, sy, n0, n1))
        weights = torch.from_numpy(patterns.reshape(-1) * electrons)
        pooled = network_input(torch.from_numpy(summed.reshape(-1, n0, n1)), weights).numpy()
    amplitudes = network_input(torch.from_numpy(counts), electrons).numpy()

    if rotation_deg is None or transpose is None:
        estimated, estimated_transpose = estimate_rotation(datacube, geometry.energy)
        rotation_deg = estimated if rotation_deg is None else rotation_deg
        transpose = estimated_transpose if transpose is None else transpose
    sub_step = (step[0] * subsample, step[1] * subsample)
    positions = scan_positions((sx, sy), sub_step, float(rotation_deg), bool(transpose))
    offsets = neighbour_offsets(sub_step, float(rotation_deg), bool(transpose)) if pool > 1 else None
    return PreprocessedData(
        amplitudes=amplitudes,
        positions=positions,
        scan_shape=(sx, sy),
        scan_step=sub_step,
        electrons_per_pattern=electrons,
        centre=centres,
        rotation_deg=float(rotation_deg),
        transpose=bool(transpose),
        data_angular_sampling=data_sampling,
        mean_pattern=counts.mean(0),
        pooled=pooled,
        neighbour_offsets=offsets,
    )
