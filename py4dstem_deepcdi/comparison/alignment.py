"""Putting every image on the deep-CDI canvas grid: field of view, ground-truth frame, resampling, registration.

A point at ``x`` Å (detector frame, the frame of ``recon.positions``) is canvas pixel ``x / sampling + origin``.
ePIE's object and the ground truth are mapped to it through their own probe positions (exact, no fitting); an
optional sub-pixel registration (:func:`py4dstem_deepcdi.frc.register_images`) then refines the ePIE image. The
common field of view is the largest axis-aligned rectangle of canvas pixels that every image covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial import Delaunay, QhullError

from ..frc import register_images
from .inputs import ReconstructionLike, full_scan_shape, subsample_of, used_positions_mask

#: smallest common field of view (pixels per side) worth comparing
MIN_FOV_PX = 8


# ================================================================================================== geometry
def largest_rectangle(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Largest axis-aligned rectangle of True pixels of a 2-D mask: ``(r0, r1, c0, c1)``, half-open; of equal areas
    the squarest (a better FRC); ``(0, 0, 0, 0)`` when the mask has no True pixel."""
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
                squarer = min(height, c - left) > min(best[1][1] - best[1][0], best[1][3] - best[1][2])
                if area > best[0] or (area == best[0] and area > 0 and squarer):
                    best = (area, (r - height + 1, r + 1, left, c))
            stack.append(c)
    return best[1]


def inside_hull(points: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Whether each grid point (M, 2) lies inside the convex hull of ``points`` (J, 2), both in the same units.

    Raises ``ValueError`` when the points are collinear (a one-line scan has no 2-D field of view).
    """
    try:
        return Delaunay(points).find_simplex(grid) >= 0
    except QhullError as exc:
        raise ValueError(
            "the probe positions are collinear (a one-line scan): no 2-D field of view to compare"
        ) from exc


def inside_array(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Whether each pixel coordinate (M, 2) lies within an array of ``shape`` (between the first and last pixel
    centres, where interpolation needs no extrapolation)."""
    return np.all((pixels >= 0) & (pixels <= np.asarray(shape[:2]) - 1), axis=1)


def common_box(ok: np.ndarray, shape: tuple[int, int], message: str) -> tuple[int, int, int, int]:
    """Largest rectangle ``(r0, r1, c0, c1)`` of canvas pixels where ``ok`` (M,) holds on a canvas of ``shape``.

    Raises ``ValueError(message)`` when it is smaller than :data:`MIN_FOV_PX` pixels on a side.
    """
    r0, r1, c0, c1 = largest_rectangle(ok.reshape(shape))
    if min(r1 - r0, c1 - c0) < MIN_FOV_PX:
        raise ValueError(message)
    return int(r0), int(r1), int(c0), int(c1)


@dataclass(frozen=True)
class CanvasGrid:
    """Every pixel of a reconstruction's canvas: ``sampling`` (2,) Å/pixel, ``origin_px`` (2,) the canvas pixel of
    0 Å, ``shape`` (rows, columns), ``pixels`` (M, 2) pixel indices (row-major) and ``points_A`` (M, 2) their
    positions in Å (detector frame)."""

    sampling: np.ndarray
    origin_px: np.ndarray
    shape: tuple[int, int]
    pixels: np.ndarray
    points_A: np.ndarray

    @classmethod
    def of(cls, recon: ReconstructionLike) -> CanvasGrid:
        """The canvas of a finished reconstruction."""
        sampling = np.asarray(recon.sampling, dtype=np.float64)
        origin = (recon.positions_px - recon.positions / sampling).mean(0)
        height, width = recon.object_phase.shape
        pixels = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1)
        pixels = pixels.reshape(-1, 2).astype(np.float64)
        return cls(sampling, origin, (height, width), pixels, (pixels - origin) * sampling)

    def box_points_A(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """Positions (Å) of the pixels of ``box`` = ``(r0, r1, c0, c1)``: (h, w, 2)."""
        r0, r1, c0, c1 = box
        return self.points_A.reshape(*self.shape, 2)[r0:r1, c0:c1]


def deep_cdi_field_of_view(recon: ReconstructionLike, min_coverage: float) -> tuple[CanvasGrid, np.ndarray]:
    """The canvas of a reconstruction and its usable pixels (M,): finite, inside the convex hull of the probe
    positions and covered at >= ``min_coverage`` of the typical (90th percentile) coverage.

    Raises ``ValueError`` when no :data:`MIN_FOV_PX`-square rectangle of usable pixels exists.
    """
    grid = CanvasGrid.of(recon)
    coverage = np.asarray(recon.coverage, dtype=np.float64).ravel()
    ok = inside_hull(recon.positions_px, grid.pixels) & np.isfinite(recon.object_phase).ravel()
    if ok.any():
        ok &= coverage >= min_coverage * np.percentile(coverage[ok], 90)
    common_box(
        ok, grid.shape,
        f"the deep-CDI field of view is too small to compare: {int(ok.sum())} pixels covered at >= "
        f"{min_coverage:g} of the typical coverage and no {MIN_FOV_PX}×{MIN_FOV_PX} pixel rectangle; "
        "scan a larger area or lower min_coverage",
    )
    return grid, ok


# ================================================================================================== resampling
def sample(array: np.ndarray, coords: np.ndarray, order: int = 3) -> np.ndarray:
    """Values of a real or complex 2-D array at pixel coordinates ``coords`` (2, ...) by spline interpolation of
    ``order`` (default cubic); points outside take the nearest edge value."""
    if np.iscomplexobj(array):
        return map_coordinates(array.real, coords, order=order, mode="nearest") + 1j * map_coordinates(
            array.imag, coords, order=order, mode="nearest"
        )
    return map_coordinates(np.asarray(array, dtype=np.float64), coords, order=order, mode="nearest")


def register(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Sub-pixel shift (2,) in pixels such that ``moving(r + shift) ≈ reference(r)``."""
    # register_images: image_2(r) ≈ image_1(r - shift)  ⇔  moving(r + shift) ≈ reference(r)
    return np.asarray(register_images(reference, moving).shift, dtype=np.float64)


def epie_image(epie, obj: np.ndarray, points_A: np.ndarray, shift_px: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Phase (rad) of an ePIE object (complex, ePIE's object grid) at the points ``points_A`` (..., 2) Å, moved by
    ``shift_px`` canvas pixels of size ``sampling`` Å; ``epie`` is the :class:`~.epie.EPIEResult` that placed it."""
    coords = epie.to_pixels(points_A) + np.asarray(shift_px) * np.asarray(sampling) / np.asarray(epie.sampling)
    return np.angle(sample(obj, np.moveaxis(coords, -1, 0)))


# ================================================================================================== ground truth
@dataclass(frozen=True)
class TruthFrame:
    """A ground-truth phase image (rad) with its pixel size (Å) and its frame: the truth pixel of a point ``x`` Å
    of the reconstruction's frame is ``(x + delta) / sampling``."""

    phase: np.ndarray
    sampling: tuple[float, float]
    delta: np.ndarray

    def to_pixels(self, points_A: np.ndarray) -> np.ndarray:
        """Truth-pixel coordinates (..., 2) of points (..., 2) in Å of the reconstruction's frame."""
        return (np.asarray(points_A, dtype=np.float64) + self.delta) / np.asarray(self.sampling)

    def image(self, points_A: np.ndarray) -> np.ndarray:
        """The truth (rad) interpolated at points (..., 2) Å of the reconstruction's frame."""
        return sample(self.phase, np.moveaxis(self.to_pixels(points_A), -1, 0))


def _truth_parts(ground_truth):
    """(phase, sampling, positions) of a SimulatedDataset or a 3-tuple; raises ``TypeError`` otherwise."""
    if all(hasattr(ground_truth, name) for name in ("phase", "sampling", "positions")):  # a SimulatedDataset
        return ground_truth.phase, ground_truth.sampling, ground_truth.positions
    try:
        phase, sampling, positions = ground_truth
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "ground_truth must be a SimulatedDataset or a tuple (phase rad, sampling Å, positions): positions "
            "(J, 2) Å in the truth's frame (same order as the reconstruction's) or a (2,) offset Å"
        ) from exc
    return phase, sampling, positions


def _used_truth_positions(positions: np.ndarray, recon: ReconstructionLike) -> np.ndarray:
    """The truth's positions of the whole scan (J, 2) reduced to those the reconstruction used (subsampled, masked).

    Raises ``ValueError`` when they do not describe the reconstruction's scan.
    """
    full = full_scan_shape(recon)
    s = subsample_of(recon)
    if positions.shape == (full[0] * full[1], 2):
        positions = positions.reshape(*full, 2)[::s, ::s].reshape(-1, 2)
        mask = used_positions_mask(recon)
        positions = positions if mask is None else positions[mask.ravel()]
    if len(positions) != len(recon.positions):
        raise ValueError(
            f"the ground truth has {len(positions)} positions but the reconstruction {len(recon.positions)}; give the "
            "positions of the same scan (or a (2,) offset in Å)"
        )
    return positions


def truth_frame(ground_truth, recon: ReconstructionLike) -> TruthFrame | None:
    """The ground truth on the reconstruction's frame (None for None).

    ``ground_truth`` is a :class:`~py4dstem_deepcdi.SimulatedDataset` or ``(phase rad, sampling Å, positions)``
    with positions (J, 2) Å in the truth's frame (the reconstruction's scan order, or the full scan of a
    subsampled reconstruction) or a (2,) offset Å between the frames.

    Raises ``TypeError`` for another type, ``ValueError`` for a phase that is not 2-D, another number of positions,
    or positions that are not the reconstruction's shifted (another scan rotation, transpose or order).
    """
    if ground_truth is None:
        return None
    phase, sampling, positions = _truth_parts(ground_truth)
    phase = np.asarray(phase, dtype=np.float64)
    if phase.ndim != 2:
        raise ValueError(f"the ground-truth phase must be a 2-D image, got shape {phase.shape}")
    sampling = (float(sampling), float(sampling)) if np.isscalar(sampling) else tuple(float(s) for s in sampling)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape == (2,):
        return TruthFrame(phase, sampling, positions)
    mine = recon.positions
    if len(positions) != len(mine):
        positions = _used_truth_positions(positions, recon)
    difference = positions - mine
    delta = difference.mean(0)
    residual = float(np.abs(difference - delta).max())
    if residual > 0.05 * min(sampling):
        raise ValueError(
            f"the ground-truth positions are not the reconstruction's positions shifted (residual {residual:.3g} Å): "
            "check the scan rotation/transpose and the position order"
        )
    return TruthFrame(phase, sampling, delta)
