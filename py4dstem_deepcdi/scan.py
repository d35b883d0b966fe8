"""Scan geometry: raster probe positions in the detector's frame and electrons per pattern.

positions = R(rotation) · [i·step_x, j·step_y] about the scan's centre, then (x, y) swapped if transposed
electrons per pattern = dose (e⁻/Å²) × step_x × step_y (Å²)
"""

from __future__ import annotations

import math

import numpy as np
import py4DSTEM
from py4DSTEM.process.phase.utils import AffineTransform


def electrons_per_pattern(dose: float, scan_step: float | tuple[float, float]) -> float:
    """Electrons per diffraction pattern from a dose (e⁻/Å²) and the scan step (Å, scalar or (x, y))."""
    step_x, step_y = (scan_step, scan_step) if np.isscalar(scan_step) else scan_step
    for name, value in (("dose", dose), ("scan_step", step_x), ("scan_step", step_y)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(dose * step_x * step_y)


def _whole(value) -> bool:
    """Whether ``value`` is an integer (a Python or numpy integer, not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def scan_positions(
    scan_shape: tuple[int, int],
    scan_step: float | tuple[float, float],
    rotation_deg: float = 0.0,
    transpose: bool = False,
) -> np.ndarray:
    """Raster-scan probe positions (Rx*Ry, 2) in Å in the detector's frame.

    The scan grid is rotated by ``rotation_deg`` about its centre and optionally transposed, with the same
    convention (and the same code, py4DSTEM's ``AffineTransform``) as py4DSTEM's ptychography uses for
    ``force_com_rotation`` and ``force_com_transpose``.

    Raises ``ValueError`` unless ``scan_shape`` is two positive integers, the steps positive and finite and the
    rotation finite.
    """
    shape = np.asarray(scan_shape, dtype=object).ravel() if not isinstance(scan_shape, str) else None
    if shape is None or len(shape) != 2 or not all(_whole(n) and n >= 1 for n in shape):
        raise ValueError(f"scan_shape must be two positive integers (Rx, Ry), got {scan_shape!r}")
    steps = np.asarray(scan_step, dtype=object).ravel() if not isinstance(scan_step, str) else None
    if steps is None or len(steps) not in (1, 2):
        raise ValueError(f"scan_step must be one number or two (Å), got {scan_step!r}")
    step_x, step_y = (steps[0], steps[0]) if len(steps) == 1 else steps
    for value in (step_x, step_y, rotation_deg):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"scan_step and rotation_deg must be numbers, got {scan_step!r} and {rotation_deg!r}")
    if not all(math.isfinite(v) and v > 0 for v in (step_x, step_y)) or not math.isfinite(rotation_deg):
        raise ValueError(f"scan_step must be positive and finite (Å), rotation_deg finite; got {scan_step!r} and "
                         f"{rotation_deg!r}")
    scan_shape = (int(shape[0]), int(shape[1]))
    x, y = np.meshgrid(np.arange(scan_shape[0]) * step_x, np.arange(scan_shape[1]) * step_y, indexing="ij")
    return rotate_positions(np.stack([x.ravel(), y.ravel()], -1), rotation_deg, transpose)


def rotate_positions(positions: np.ndarray, rotation_deg: float = 0.0, transpose: bool = False) -> np.ndarray:
    """Probe positions (J, 2) given in Å in the scan's frame (axis 0 = Rx, axis 1 = Ry; raster or measured) in the
    detector's frame: rotated by ``rotation_deg`` about their mean and optionally transposed, py4DSTEM's convention
    for ``initial_scan_positions`` (float64 copy)."""
    positions = np.array(positions, dtype=np.float64).reshape(-1, 2)
    if rotation_deg:
        positions = np.asarray(
            AffineTransform(angle=np.deg2rad(rotation_deg))(positions, positions.mean(0)), np.float64
        )
    if transpose:
        positions = np.flip(positions, 1)
    return positions


def neighbour_offsets(
    scan_step: float | tuple[float, float], rotation_deg: float = 0.0, transpose: bool = False
) -> np.ndarray:
    """Offsets (9, 2) in Å, in the detector's frame, from a scan position to its 3×3 neighbourhood (itself first,
    then the 8 neighbours in raster order), with the convention of :func:`scan_positions`."""
    grid = scan_positions((3, 3), scan_step, rotation_deg, transpose)
    offsets = grid - grid[4]
    return np.concatenate([offsets[4:5], offsets[:4], offsets[5:]])


def calibrated_datacube(data: np.ndarray, scan_step: float, angular_sampling: float) -> py4DSTEM.DataCube:
    """A py4DSTEM DataCube of ``data`` (Rx, Ry, Qx, Qy) with its scan step (Å) and detector pixel (mrad) set.

    The array is used as it is (not copied).
    """
    datacube = py4DSTEM.DataCube(data=data)
    datacube.calibration.set_R_pixel_size(float(scan_step))
    datacube.calibration.set_R_pixel_units("A")
    datacube.calibration.set_Q_pixel_size(float(angular_sampling))
    datacube.calibration.set_Q_pixel_units("mrad")
    return datacube
