"""Stitching of phase patches into one image (paper Eq. 2).

Each network output is a phase patch (radians) on the real-space window grid, trustworthy only inside the
illuminated ``mask`` and known only up to an unknown constant per patch (the zero frequency of a diffraction
pattern's phase is lost). :func:`solve_offsets` finds the per-patch constants ``c_i`` that minimise

    E = sum_{i, j != i} [ mean(phi_i over S_ij) + c_i - mean(phi_j over S_ji) - c_j ]^2,

``S_ij`` being the part of patch ``i``'s mask that patch ``j``'s mask overlaps (the paper's objective; the sum runs
over ordered pairs, so every overlapping pair counts twice). :func:`stitch` then places the corrected patches on a
canvas with sub-pixel bilinear splatting and averages them where they overlap.

Conventions
-----------
* ``patches``: ``(J, h, w)`` float phase (rad). Values outside ``mask`` are ignored (they may be NaN).
* ``positions_px``: ``(J, 2)`` float canvas-pixel coordinates ``(row, col)`` of each patch's centre pixel: patch
  pixel ``(a, b)`` lands on canvas coordinate ``(pos[0] + a - h // 2, pos[1] + b - w // 2)``.
* Two patches form a pair when the overlap of their masks, computed with their relative position rounded to whole
  pixels, ``d = rint(pos_j - pos_i)``, covers at least ``min_overlap`` of the mask area. Non-integer relative
  positions get a first-order correction of the overlap means for that rounding.
* Options of the solve: :class:`StitchOptions` (``method="lsq"``: exact least squares by conjugate gradients;
  ``"relaxation"``: the paper's damped sweeps), or its field names as keywords of :func:`stitch` and
  :func:`solve_offsets`.
* ``device="cpu"`` computes with numpy and SciPy, ``device="gpu"`` with CuPy and ``cupyx.scipy`` (one code path);
  the small coarse-grid system of the preconditioner is always factorised and solved on the host.

Modules: :mod:`.overlap` (the mask's overlap regions), :mod:`.pairs` (pair search and mismatches),
:mod:`.equations` (normal equations), :mod:`.coarse` (components and the two-level preconditioner),
:mod:`.relaxation`, :mod:`.solve` (:func:`solve_offsets`), :mod:`.place` (bilinear accumulation on the canvas),
:mod:`.image` (:func:`stitch`).
"""

from .image import StitchResult, stitch
from .options import StitchOptions
from .solve import OffsetSolution, solve_offsets

__all__ = ["OffsetSolution", "StitchOptions", "StitchResult", "solve_offsets", "stitch"]
