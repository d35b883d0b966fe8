"""The stitched image: offsets (solved or given), then the plain average of the corrected patches on a canvas."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import asnumpy, get_array_module
from .inputs import check_inputs, masked_values
from .options import StitchOptions, resolve_options
from .place import accumulate, default_canvas_shape, default_origin
from .solve import OffsetSolution, solve_masked

#: the most pixels a stitched canvas may have (each float64 canvas array then takes 2 GiB)
MAX_CANVAS_PIXELS = 1 << 28


@dataclass
class StitchResult:
    """A stitched phase image and how it was made.

    Attributes
    ----------
    image:
        2-D float64 canvas (rad): the average of the corrected patches over their mask pixels (bilinear weights
        for sub-pixel positions); ``fill_value`` (NaN by default) where no patch contributes (``coverage == 0``).
    coverage:
        2-D float64 canvas: the accumulated weights (mask pixels times bilinear weights; with whole-pixel positions
        the number of patches covering each pixel).
    offsets:
        ``(J,)`` the per-patch offsets that were applied (rad).
    origin_px:
        ``(2,)`` float64: the canvas coordinate of ``positions_px = (0, 0)``; a position ``p`` sits at canvas
        coordinate ``p + origin_px``.
    solution:
        The :class:`OffsetSolution` when the offsets were solved here, ``None`` when they were given.
    n_outside:
        Number of patches that fell entirely outside a user-given canvas (they were skipped).
    """

    image: Any
    coverage: Any
    offsets: Any
    origin_px: np.ndarray
    solution: OffsetSolution | None
    n_outside: int = 0


def stitch(patches, positions_px, mask, options: StitchOptions | None = None, *, offsets=None,
           canvas_shape: tuple[int, int] | None = None, origin_px=None, fill_value: float = float("nan"),
           device: str = "cpu", **keywords) -> StitchResult:
    """Stitch phase patches into one image: solve the Eq. 2 offsets (unless given), then average on a canvas.

    Parameters
    ----------
    patches, positions_px, mask:
        As for :func:`solve_offsets`: ``(J, h, w)`` phase (rad), ``(J, 2)`` canvas-pixel (row, col) of each patch's
        centre pixel, ``(h, w)`` boolean valid-pixel mask.
    options, **keywords:
        How the offsets are solved: a :class:`StitchOptions` and/or its field names as keywords (``method``,
        ``min_overlap``, ``n_iter``, ``step``, ``tol``, ``max_iter``); unused when ``offsets`` are given.
    offsets:
        ``(J,)`` per-patch offsets (rad) to apply instead of solving them.
    canvas_shape, origin_px:
        Canvas size (rows, cols) and the canvas coordinate of ``positions_px = (0, 0)``. Default origin: the
        smallest position lands at ``(h // 2, w // 2)`` plus its fractional part; default canvas: just large
        enough for every patch. Patches entirely outside a given canvas are skipped (counted in ``n_outside``,
        with a warning), partly outside ones are clipped.
    fill_value:
        Image value where no patch contributes (``coverage == 0``); NaN by default.
    device:
        ``"cpu"`` (numpy) or ``"gpu"`` (CuPy); the returned arrays live there.

    Returns
    -------
    StitchResult
        ``image`` = sum(w · corrected phase) / sum(w), ``w`` the bilinear weights of the sub-pixel positions
        over every patch's mask pixels; ``coverage`` = sum(w); the offsets applied, ``origin_px``, and the
        solver's report.

    Raises
    ------
    TypeError
        A keyword that is not a :class:`StitchOptions` field.
    ValueError
        As :func:`solve_offsets`; also offsets of the wrong shape or not finite, a bad ``origin_px`` or
        ``canvas_shape``.
    """
    options = resolve_options(options, keywords, "stitch")
    xp = get_array_module(device)
    patches, positions, mask = check_inputs(xp, patches, positions_px, mask, need_pairs=offsets is None)
    n, h, w = (int(s) for s in patches.shape)
    mask_h = asnumpy(mask)
    values = masked_values(xp, patches, xp.asarray(np.flatnonzero(mask_h.ravel())))
    solution = None
    if offsets is None:
        solution = solve_masked(xp, values, positions, mask, options)
        offsets = solution.offsets
    else:
        offsets = _checked_offsets(xp, offsets, n)

    positions_h = asnumpy(positions)
    origin = default_origin(positions_h, h, w) if origin_px is None else np.asarray(asnumpy(origin_px), np.float64)
    if origin.shape != (2,) or not np.isfinite(origin).all():
        raise ValueError(f"origin_px must be two finite numbers (row, col), got {origin_px!r}")
    if canvas_shape is None:
        canvas_shape = default_canvas_shape(positions_h, origin, h, w)
        if canvas_shape[0] * canvas_shape[1] > MAX_CANVAS_PIXELS:
            span = np.ptp(positions_h, axis=0)
            raise ValueError(
                f"the positions span {span[0]:.4g} × {span[1]:.4g} pixels: a canvas of {canvas_shape[0]} × "
                f"{canvas_shape[1]} pixels exceeds {MAX_CANVAS_PIXELS:,}; positions_px must be in pixels of the phase "
                "image (Å / sampling)"
            )
    else:
        canvas_shape = tuple(int(s) for s in canvas_shape)
        if len(canvas_shape) != 2 or min(canvas_shape) < 1 or canvas_shape[0] * canvas_shape[1] > MAX_CANVAS_PIXELS:
            raise ValueError(
                f"canvas_shape must be two positive integers with at most {MAX_CANVAS_PIXELS:,} pixels, got "
                f"{canvas_shape!r}"
            )

    total, coverage, n_outside = accumulate(xp, values, np.argwhere(mask_h), positions, origin, canvas_shape,
                                            (h, w), offsets)
    if n_outside:
        warnings.warn(f"{n_outside} patches fall entirely outside the canvas and were skipped", RuntimeWarning,
                      stacklevel=2)
    covered = coverage > 0
    image = xp.where(covered, total / xp.where(covered, coverage, 1.0), fill_value)
    if not bool(xp.isfinite(image[covered]).all()):
        raise ValueError(
            f"the stitched image overflowed: the patches hold values up to {float(xp.abs(values).max()):.3g} inside "
            "the mask, which are not phases (rad)"
        )
    return StitchResult(image=image, coverage=coverage, offsets=offsets, origin_px=origin, solution=solution,
                        n_outside=n_outside)


def _checked_offsets(xp, offsets, n: int):
    offsets = xp.asarray(offsets, dtype=xp.float64)
    if offsets.shape != (n,):
        raise ValueError(f"offsets must have shape ({n},), got {tuple(offsets.shape)}")
    if not bool(xp.isfinite(offsets).all()):
        raise ValueError("offsets contain NaN or infinite values")
    return offsets
