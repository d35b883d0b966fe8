"""Experimental DataCube → network input: defects, calibration, resampling, centring, normalisation, positions.

Never modifies the user's datacube: every step reads from it and writes new arrays. Counts are read in float64.

0. Defects (:mod:`.defects`): bool/complex data refused, NaN/negative counts refused, hot and dead pixels found and
   repaired before any other step reads the counts.
1. Calibrations: real-space step (Å) and detector pixel (mrad, or Å⁻¹ converted with λ) from the DataCube or the
   arguments; a missing one is refused with the call that sets it. The bright-field disk's measured radius is
   checked against the radii of the nominal (sharp) aperture and the model's apertures (``CALIBRATION_TOLERANCE``).
2. Centre: the bright-field disk's centre of mass in every pattern, fitted by a plane over the scan (descan) that
   ignores outlier patterns, so that object-induced deflections (the signal) are kept and only the instrument's
   shift is removed.
3. Resampling: each pattern is integrated over the model's detector pixels (area-weighted, counts conserved),
   centred on the fitted disk centre with sub-pixel precision: any angular sampling ≥ the data's range works.
4. Normalisation: ``encoding.network_input`` with each pattern's own electrons (``normalise="pattern"``, default) or
   the dataset's mean (``"dataset"``); for a pooled network also the sum of each position's 3×3 scan neighbourhood
   (``encoding.neighbour_sum``), normalised by the electrons of the patterns summed.
5. Positions: the raster scan × step, rotated/transposed like py4DSTEM (rotation from the user, or estimated from
   the curl of the centre-of-mass field, :func:`fit_rotation`, when that estimate is reliable), optionally every
   n-th position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .defects import (
    ScanStatistics,
    StaticDefects,
    check_counts_dtype,
    find_static_defects,
    fit_plane_robust,
    repair_static,
    repair_transients,
    scan_statistics,
)
from .encoding import neighbour_sum, network_input
from .probe import ProbeGeometry, vacuum_pattern
from .rotation import RotationFit, choose_rotation, fit_rotation
from .scan import neighbour_offsets, scan_positions

_LENGTH_UNITS = {"A": 1.0, "Å": 1.0, "nm": 10.0, "pm": 0.01}
#: relative distance of the measured bright-field disk radius outside the radii of the nominal (sharp) aperture and the
#: model's apertures above which preprocess() refuses (``check_calibration=False`` overrides)
CALIBRATION_TOLERANCE = 0.05
NORMALISATIONS = ("pattern", "dataset")


@dataclass
class PreprocessedData:
    """Network-ready data.

    Attributes: ``amplitudes`` (J, N, N) float32 network input; ``positions`` (J, 2) probe positions in Å in the
    detector frame; ``scan_shape`` (Rx, Ry) after subsampling; ``scan_step`` (Å, after subsampling);
    ``electrons_per_pattern`` (mean counts per resampled pattern); ``centre`` (Rx, Ry, 2) fitted disk centres in
    data pixels; ``rotation_deg``, ``transpose``; ``data_angular_sampling`` (mrad/pixel of the input);
    ``mean_pattern`` (N, N) mean resampled counts; for a pooled network (``pool=3``) ``pooled`` (J, N, N), the
    normalised amplitudes of each position's summed 3×3 neighbourhood, and ``neighbour_offsets`` (9, 2) Å;
    ``pattern_electrons`` (J,) counts of each resampled pattern; ``bright_field_radius_mrad`` the measured disk
    radius; ``rotation_fit`` the centre-of-mass rotation fit (:class:`RotationFit`); ``report`` what was repaired,
    measured and decided (:func:`report_lines` prints it).
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
    pattern_electrons: np.ndarray | None = None
    bright_field_radius_mrad: float | None = None
    rotation_fit: RotationFit | None = None
    report: dict[str, Any] = field(default_factory=dict)


def datacube_array(datacube) -> np.ndarray:
    """The 4-D (Rx, Ry, Qx, Qy) array of a py4DSTEM DataCube or array, with clear errors for other shapes.

    Raises ``TypeError`` for bool, complex or non-numeric values and ``ValueError`` for another shape."""
    data = datacube if isinstance(datacube, np.ndarray) else getattr(datacube, "data", datacube)
    if hasattr(data, "dtype"):
        check_counts_dtype(data)
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


def fit_disk_centres(
    data: np.ndarray, chunk_rows: int = 16, defects: StaticDefects | None = None, repair: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disk centres (Rx, Ry, 2) of every pattern (data pixels), fitted by a plane over the scan that ignores outliers.

    Hot and dead pixels are repaired first (``defects``, and transient hot pixels when ``repair``).

    Returns
    -------
    (plane (Rx, Ry, 2), measured centres of mass (Rx, Ry, 2), plane-fit weights (Rx, Ry): 0 for rejected outliers)
    """
    rx, ry = data.shape[:2]
    com = np.empty((rx, ry, 2))
    for start in range(0, rx, chunk_rows):
        com[start : start + chunk_rows] = centres_of_mass(_repaired(data[start : start + chunk_rows], defects, repair))
    plane, weights = fit_plane_robust(com)
    return plane, com, weights


def _repaired(block, defects: StaticDefects | None, repair: bool) -> np.ndarray:
    """A float64 copy of ``block`` (..., Qx, Qy), clipped at 0, with static then transient hot pixels repaired."""
    block = np.array(block, dtype=np.float64)
    np.clip(block, 0, None, out=block)
    if repair:
        if defects is not None:
            repair_static(block.reshape(-1, 1, *block.shape[-2:]), defects.mask)
        repair_transients(block)
    return block


def bright_field_radius(pattern: np.ndarray) -> float:
    """Radius (pixels) of the disk whose area is that of the pattern above half the bright-field level.

    The pattern is median-filtered (3×3: single hot pixels go) and smoothed (Gaussian, σ = 1 pixel) so that Poisson
    noise at low dose neither raises the level nor breaks the disk up; the level is the median of the smoothed pixels
    above half their maximum (the disk's plateau, insensitive to the brighter spots of a crystal)."""
    filtered = ndimage.median_filter(np.asarray(pattern, dtype=np.float64), size=3, mode="nearest")
    smoothed = ndimage.gaussian_filter(filtered, 1.0, mode="nearest")
    level = float(np.median(smoothed[smoothed > 0.5 * smoothed.max()]))
    return float(np.sqrt((smoothed > 0.5 * level).sum() / np.pi))


def aperture_radius_mrad(geometry: ProbeGeometry, nominal: bool = False) -> float:
    """The bright-field radius (mrad, :func:`bright_field_radius`) of a geometry's own aperture, or with ``nominal``
    of a sharp aperture of its semi-angle, on its detector."""
    pattern = geometry.aperture_edge(0.0) if nominal else np.abs(geometry.probe_fourier) ** 2
    return bright_field_radius(pattern) * geometry.angular_sampling


def expected_radii_mrad(geometry: ProbeGeometry, *radii: float) -> tuple[float, float]:
    """(min, max) of the bright-field radii (mrad) a calibrated dataset may show: the geometry's nominal (sharp) and
    own apertures, and ``radii`` (e.g. those of the aperture edges a model was trained over)."""
    values = [aperture_radius_mrad(geometry, nominal=True), aperture_radius_mrad(geometry), *radii]
    return (min(values), max(values))


def centred_mean_pattern(
    data, com: np.ndarray, defects: StaticDefects | None, repair: bool, size: int = 32
) -> np.ndarray:
    """Mean (Qx, Qy) float64 of the central ≤ size×size patterns of the scan, each moved by whole pixels onto their
    mean centre of mass (no descan blur), hot and dead pixels repaired."""
    rx, ry = data.shape[:2]
    r0, r1 = max((rx - size) // 2, 0), max((ry - size) // 2, 0)
    block = _repaired(data[r0 : r0 + size, r1 : r1 + size], defects, repair)
    centres = com[r0 : r0 + size, r1 : r1 + size].reshape(-1, 2)
    shifts = np.rint(centres.mean(0) - centres).astype(int)
    patterns = block.reshape(-1, *block.shape[-2:])
    return np.mean([np.roll(p, tuple(s), (0, 1)) for p, s in zip(patterns, shifts)], 0)


def check_bright_field(
    radius_px: float, data_sampling: float, expected_mrad: tuple[float, float], wavelength: float,
    tolerance: float = CALIBRATION_TOLERANCE,
) -> None:
    """Raise ``ValueError`` when the measured bright-field radius (data pixels × ``data_sampling`` mrad) lies more than
    ``tolerance`` outside ``expected_mrad`` (:func:`expected_radii_mrad`), naming both radii, the
    detector pixel size the data imply and the likely cause (mrad vs Å⁻¹ units, camera length, semi-angle)."""
    measured = radius_px * data_sampling
    lo, hi = expected_mrad
    if lo * (1 - tolerance) <= measured <= hi * (1 + tolerance):
        return
    expected = lo if measured < lo else hi
    ratio = measured / expected
    implied = expected / max(radius_px, 1e-9)
    unit = wavelength * 1e3  # mrad per Å⁻¹
    if abs(math.log(ratio / unit)) < 0.2 or abs(math.log(ratio * unit)) < 0.2:
        cause = (
            f"the ratio {ratio:.3g} is λ·1000 = {unit:.3g} (or its inverse): the detector pixel size is in mrad but "
            "labelled Å⁻¹, or the reverse; fix datacube.calibration.set_Q_pixel_units"
        )
    else:
        cause = (
            f"the detector pixel size (camera length) is off by ×{1 / ratio:.3g}, or semiangle_cutoff is wrong; the "
            f"data imply {implied:.4g} mrad per pixel"
        )
    raise ValueError(
        f"the data's bright-field disk has a radius of {radius_px:.2f} pixels = {measured:.3g} mrad with the detector "
        f"calibration of {data_sampling:.4g} mrad/pixel, but the semi-angle and the model's apertures imply "
        f"{expected:.3g} mrad ({expected / data_sampling:.2f} pixels; tolerance {tolerance:.0%}): {cause}. Pass "
        "check_calibration=False to reconstruct anyway"
    )


def _check_reach(centres: np.ndarray, data_shape: tuple[int, int], data_sampling: float, geometry: ProbeGeometry):
    """Raise ``ValueError`` unless the model's detector, in data pixels about every disk centre, lies on the data's
    detector (one data pixel of slack at the edge)."""
    qx, qy = data_shape
    ratio = geometry.angular_sampling / data_sampling
    shape = np.array(geometry.detector_shape)
    lowest, highest = centres.reshape(-1, 2).min(0), centres.reshape(-1, 2).max(0)
    low = lowest - (shape // 2 + 0.5) * ratio
    high = highest + (shape - shape // 2 - 0.5) * ratio
    if np.any(low < -1.5) or np.any(high > np.array([qx, qy]) + 0.5):
        reach = min(float(np.min(lowest + 0.5)), float(np.min(np.array([qx, qy]) - 0.5 - highest)))
        raise ValueError(
            f"the datacube's detector reaches only ±{reach * data_sampling:.1f} mrad around the bright-field disk, "
            f"but the model needs ±{shape.max() * geometry.angular_sampling / 2:.1f} mrad ({shape[0]}×{shape[1]} "
            f"pixels of {geometry.angular_sampling:g} mrad); record with a shorter camera length, check the "
            "detector calibration (mrad vs Å⁻¹), or use a model trained for a smaller angular range"
        )


def _resampled_counts(
    data_view, centres: np.ndarray, data_sampling: float, geometry: ProbeGeometry, defects: StaticDefects | None,
    repair: bool, scale: float, chunk_rows: int,
) -> np.ndarray:
    """Repaired patterns of ``data_view`` (Sx, Sy, Qx, Qy) resampled onto the model's detector, divided by the power
    of two ``scale`` (exact; keeps float32 far from overflow): (Sx·Sy, N0, N1) float32."""
    sx, sy, qx, qy = data_view.shape
    counts = np.empty((sx * sy, *geometry.detector_shape), dtype=np.float32)
    for start in range(0, sx, chunk_rows):
        block = _repaired(data_view[start : start + chunk_rows], defects, repair)
        rows = len(block)
        patterns = torch.from_numpy((block / scale).astype(np.float32).reshape(-1, qx, qy))
        c = torch.from_numpy(centres[start : start + rows].reshape(-1, 2))
        counts[start * sy : (start + rows) * sy] = resample_patterns(patterns, c, data_sampling, geometry).numpy()
    return counts


def _normalised(
    counts: np.ndarray, shape: tuple[int, int], normalise: str, pool: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Network inputs of resampled counts (J, N0, N1): ``(amplitudes, pooled or None, electrons (J,) float64)``,
    each pattern (and neighbourhood) normalised by its own electrons or by the dataset's mean."""
    totals = counts.sum((-2, -1), dtype=np.float64)
    if normalise == "pattern" and np.any(totals <= 0):
        raise ValueError(
            f"{int((totals <= 0).sum())} pattern(s) hold no counts on the model's detector; remove those positions "
            'or use normalise="dataset"'
        )
    electrons = totals if normalise == "pattern" else np.full(len(totals), totals.mean())
    pooled = None
    if pool > 1:
        n0, n1 = counts.shape[-2:]
        summed, patterns = neighbour_sum(counts.reshape(*shape, n0, n1))
        if normalise == "pattern":
            weights = summed.sum((-2, -1), dtype=np.float64).reshape(-1)
        else:
            weights = patterns.reshape(-1) * totals.mean()
        pooled = network_input(torch.from_numpy(summed.reshape(-1, n0, n1)), torch.from_numpy(weights)).numpy()
    amplitudes = network_input(torch.from_numpy(counts), torch.from_numpy(electrons)).numpy()
    return amplitudes, pooled, totals


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
    repair: bool = True,
    normalise: str = "pattern",
    check_calibration: bool = True,
    bright_field_mrad: tuple[float, float] | None = None,
) -> PreprocessedData:
    """Turn a DataCube (or a 4-D array with ``scan_step`` and ``angular_sampling``) into network input.

    Parameters
    ----------
    datacube
        py4DSTEM DataCube (Rx, Ry, Qx, Qy) in counts (electrons), or a 4-D array; integer or float.
    geometry
        The model's geometry: patterns are resampled to its detector shape and angular sampling.
    scan_step
        Scan step (Å); default from the DataCube's R calibration.
    angular_sampling
        Detector pixel size of the data (mrad); default from the DataCube's Q calibration.
    rotation_deg, transpose
        Rotation (deg) and transpose between scan and detector axes, py4DSTEM's convention; when None, estimated
        from the curl of the centre-of-mass field (:func:`fit_rotation`) if that estimate is reliable, else 0° and
        no transpose with a warning.
    subsample
        Use every n-th scan position along both axes (n × the step).
    centre
        Fit and remove the descan of the bright-field disk (True) or assume it sits at the detector's centre.
    chunk_rows
        Scan rows processed at a time (bounds memory for large datacubes; float64 copies of that many rows).
    pool
        3 for a pooled network: also sum each position's 3×3 scan neighbourhood (``pooled``); 1 (default) not.
    repair
        Find and repair hot and dead detector pixels (:mod:`.defects`); default True.
    normalise
        ``"pattern"`` (default): each pattern divided by its own electrons (immune to dose drift); ``"dataset"``:
        by the dataset's mean electrons per pattern.
    check_calibration
        Refuse (True, default) when the measured bright-field disk radius differs from ``bright_field_mrad`` by more
        than ``CALIBRATION_TOLERANCE``; False skips the check.
    bright_field_mrad
        (min, max) bright-field radii (mrad, :func:`bright_field_radius`) a calibrated dataset may show; default
        :func:`expected_radii_mrad` of ``geometry``.

    Raises
    ------
    TypeError
        Bool, complex or non-numeric data.
    ValueError
        A wrong shape, missing calibration, NaN/infinite or negative counts, empty patterns, a detector too small for
        the model, or (``check_calibration``) a bright-field disk that contradicts the calibration.
    """
    data = datacube_array(datacube)
    if pool not in (1, 3):
        raise ValueError(f"pool must be 1 (one pattern) or 3 (3×3 neighbourhoods), got {pool!r}")
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    subsample = int(subsample)
    if subsample < 1:
        raise ValueError(f"subsample must be a positive integer, got {subsample}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer (scan rows per block), got {chunk_rows!r}")
    step = real_space_step(datacube, scan_step)
    data_sampling = detector_sampling(datacube, geometry.wavelength, angular_sampling)
    rx, ry, qx, qy = data.shape

    stats = scan_statistics(data, chunk_rows, repair)
    defects = find_static_defects(stats) if repair else None
    plane, com, weights = fit_disk_centres(data, chunk_rows, defects, repair)
    radius_px = bright_field_radius(centred_mean_pattern(data, com, defects, repair))
    expected = bright_field_mrad or expected_radii_mrad(geometry)
    if check_calibration:
        check_bright_field(radius_px, data_sampling, expected, geometry.wavelength)
    centres = plane if centre else np.broadcast_to(np.array([qx // 2, qy // 2], float), (rx, ry, 2)).copy()
    _check_reach(centres, (qx, qy), data_sampling, geometry)
    band = 2 * geometry.semiangle_cutoff * 1e-3 / geometry.wavelength
    rotation = fit_rotation(com - plane, step, band, transpose if rotation_deg is None else None)
    rotation_deg, transpose, source = choose_rotation(rotation, rotation_deg, transpose)

    centres = centres[::subsample, ::subsample]
    data_view = data[::subsample, ::subsample]
    sx, sy = data_view.shape[:2]
    if sx * sy < 2:
        raise ValueError(f"subsample={subsample} leaves {sx * sy} scan position(s); use a smaller subsample")
    scale = 2.0 ** (math.floor(math.log2(stats.peak)) - 10) if stats.peak > 0 else 1.0
    counts = _resampled_counts(data_view, centres, data_sampling, geometry, defects, repair, scale, chunk_rows)
    amplitudes, pooled, totals = _normalised(counts, (sx, sy), normalise, pool)
    electrons = totals * scale
    sub_step = (step[0] * subsample, step[1] * subsample)
    report = _report(stats, defects, weights, electrons, normalise, radius_px * data_sampling, expected, rotation,
                     source)
    return PreprocessedData(
        amplitudes=amplitudes,
        positions=scan_positions((sx, sy), sub_step, rotation_deg, transpose),
        scan_shape=(sx, sy),
        scan_step=sub_step,
        electrons_per_pattern=float(electrons.mean()),
        centre=centres,
        rotation_deg=rotation_deg,
        transpose=transpose,
        data_angular_sampling=data_sampling,
        mean_pattern=counts.mean(0, dtype=np.float64) * scale,
        pooled=pooled,
        neighbour_offsets=neighbour_offsets(sub_step, rotation_deg, transpose) if pool > 1 else None,
        pattern_electrons=electrons,
        bright_field_radius_mrad=radius_px * data_sampling,
        rotation_fit=rotation,
        report=report,
    )


def _report(
    stats: ScanStatistics, defects: StaticDefects | None, weights: np.ndarray, electrons: np.ndarray, normalise: str,
    radius_mrad: float, expected: tuple[float, float], rotation: RotationFit, source: str,
) -> dict[str, Any]:
    """What preprocess() repaired, measured and decided (JSON-ready)."""
    static = defects.mask if defects is not None else np.zeros(stats.transients.shape, bool)
    transient = np.where(static, 0, stats.transients)
    return {
        "hot_pixels": np.argwhere(defects.hot).tolist() if defects is not None else [],
        "dead_pixels": np.argwhere(defects.dead).tolist() if defects is not None else [],
        "transient_hot_pixels": int(transient.sum()),
        "centre_outliers": int((weights == 0).sum()),
        "normalise": normalise,
        "electrons_per_pattern_percentiles": [float(v) for v in np.percentile(electrons, [0, 5, 50, 95, 100])],
        "bright_field_radius_mrad": float(radius_mrad),
        "bright_field_expected_mrad": [float(v) for v in expected],
        "rotation": {
            "source": source,
            "estimate_deg": float(rotation.angle_deg),
            "estimate_transpose": bool(rotation.transpose),
            "uncertainty_deg": float(rotation.uncertainty_deg),
            "reason": rotation.reason,
        },
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """The preprocessing report in words, one line per finding."""
    if not report:
        return []
    lines = []
    hot, dead, transient = report["hot_pixels"], report["dead_pixels"], report["transient_hot_pixels"]
    if hot or dead or transient:
        lines.append(
            f"repaired {len(hot)} hot and {len(dead)} dead detector pixel(s) in every pattern"
            f"{' ' + str((hot + dead)[:6]) if hot or dead else ''} and {transient} transient hot pixel(s)"
        )
    if report["centre_outliers"]:
        lines.append(f"{report['centre_outliers']} outlier disk centre(s) ignored by the descan fit")
    p = report["electrons_per_pattern_percentiles"]
    lines.append(
        f"electrons per pattern: min {p[0]:.3g}, median {p[2]:.3g}, max {p[4]:.3g}; "
        f"normalised per {report['normalise']}"
    )
    lines.append(
        f"bright-field radius {report['bright_field_radius_mrad']:.3g} mrad (model: "
        f"{'–'.join(f'{v:.3g}' for v in sorted(set(report['bright_field_expected_mrad'])))} mrad)"
    )
    r = report["rotation"]
    lines.append(
        f"rotation {r['source']}: centre-of-mass estimate {r['estimate_deg']:.1f}° ± {r['uncertainty_deg']:.2g}°"
        f"{', transposed' if r['estimate_transpose'] else ''}{' (' + r['reason'] + ')' if r['reason'] else ''}"
    )
    return lines
