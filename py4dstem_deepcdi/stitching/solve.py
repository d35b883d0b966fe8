"""The per-patch phase offsets of paper Eq. 2: pairs, normal equations, conjugate gradients, gauge."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import asnumpy, get_array_module
from .arrays import conjugate_gradients
from .coarse import CoarseGraph, TwoLevelPreconditioner, coarse_graph
from .equations import NormalEquations
from .inputs import check_inputs, masked_values
from .options import StitchOptions, resolve_options
from .overlap import overlap_geometry
from .pairs import find_pairs
from .relaxation import relax


@dataclass
class OffsetSolution:
    """Per-patch phase offsets that make overlapping patches agree, and how they were found.

    Attributes
    ----------
    offsets:
        ``(J,)`` float64 constant to add to each patch (rad); numpy or CuPy like the device.
    n_pairs:
        Number of overlapping (unordered) patch pairs used.
    energy_before, energy_after:
        The paper's objective ``E`` (rad², sum over ordered pairs of the squared mismatch of the overlap means)
        with zero offsets and with the solution; ``energy_after`` comes from the quadratic form (absolute accuracy
        about 1e-13 of ``energy_before``).
    method:
        ``"lsq"`` or ``"relaxation"``.
    iterations:
        Conjugate-gradient iterations (``"lsq"``) or relaxation sweeps.
    converged:
        ``"lsq"``: whether the relative residual of the normal equations reached ``tol``. Always ``True`` for the
        relaxation, which runs a fixed number of sweeps.
    relative_residual:
        ``|H c - g| / |g|`` of the normal equations at the returned offsets (``"lsq"``); NaN for the relaxation.
    n_components:
        Number of connected groups of overlapping patches. With more than one the groups' relative offsets are not
        determined by the data; each group's offsets are set to zero mean (a warning is emitted).
    n_shifts:
        Number of distinct rounded relative shifts that qualify as overlapping (columns of the overlap matrix).
    """

    offsets: Any
    n_pairs: int
    energy_before: float
    energy_after: float
    method: str
    iterations: int
    converged: bool
    relative_residual: float
    n_components: int
    n_shifts: int


def solve_offsets(patches, positions_px, mask, options: StitchOptions | None = None, *, device: str = "cpu",
                  **keywords) -> OffsetSolution:
    """Solve the per-patch phase offsets of paper Eq. 2.

    Parameters
    ----------
    patches:
        ``(J, h, w)`` phase patches (rad), numpy or CuPy. Only pixels inside ``mask`` are read (others may be NaN).
    positions_px:
        ``(J, 2)`` canvas-pixel coordinates (row, col) of each patch's centre pixel ``(h // 2, w // 2)``; sub-pixel
        positions are allowed (the overlap means are then corrected to first order for the rounding of the
        relative positions). A row-major lattice (raster scan, any rotation and step) is indexed directly (faster).
    mask:
        ``(h, w)`` boolean: the valid (illuminated) pixels, the same for all patches.
    options:
        A :class:`StitchOptions` (default: ``StitchOptions()``: least squares, ``min_overlap=0.25``).
    device:
        ``"cpu"`` (numpy) or ``"gpu"`` (CuPy); the offsets live there.
    **keywords:
        Fields of :class:`StitchOptions` (``method``, ``min_overlap``, ``n_iter``, ``step``, ``tol``,
        ``max_iter``), replacing those of ``options``.

    Returns
    -------
    OffsetSolution
        Offsets with zero mean per connected group of overlapping patches (the gauge), the number of pairs, and
        ``E`` (rad², over ordered pairs) before and after.

    Raises
    ------
    TypeError
        A keyword that is not a :class:`StitchOptions` field.
    ValueError
        Bad shapes, NaN/inf inside the mask or in the positions, a single patch, no overlapping pair, or an option
        outside its range.
    RuntimeError
        ``device="gpu"`` without CuPy or a CUDA GPU.
    """
    options = resolve_options(options, keywords, "solve_offsets")
    xp = get_array_module(device)
    patches, positions, mask = check_inputs(xp, patches, positions_px, mask, need_pairs=True)
    pix = xp.asarray(np.flatnonzero(asnumpy(mask).ravel()))
    return solve_masked(xp, masked_values(xp, patches, pix), positions, mask, options)


def solve_masked(xp, values, positions, mask, options: StitchOptions) -> OffsetSolution:
    """:func:`solve_offsets` on checked inputs: ``values`` ``(J, P)`` the patches' mask pixels (row-major)."""
    dtype = xp.float32 if values.dtype == xp.float32 else xp.float64
    geom = overlap_geometry(xp, mask, options.min_overlap, dtype)
    values = values.astype(dtype, copy=False)
    n_shift = len(geom.shifts)
    means = values @ geom.overlap  # (J, nD): every patch's mean over every overlap region
    gradients = None
    fraction = positions - xp.floor(positions)
    if not bool((xp.abs(fraction - fraction[0]) < 1e-9).all()):  # sub-pixel relative positions
        gradients = [values @ geom.gradients[:, :n_shift], values @ geom.gradients[:, n_shift:]]
    graph = find_pairs(xp, positions, geom, means, gradients)
    del means, gradients
    if graph.nnz == 0:
        raise ValueError(
            f"no pair of patches overlaps by at least min_overlap={options.min_overlap} of the mask area "
            f"({geom.area} pixels): the scan step is too large for the mask, or min_overlap is too high"
        )
    coarse = coarse_graph(xp, graph)
    equations = NormalEquations(xp, graph)
    if options.method == "lsq":
        preconditioner = TwoLevelPreconditioner(xp, equations.degree, coarse)
        offsets, iterations, converged = conjugate_gradients(
            xp, equations.matvec, preconditioner, equations.rhs, tol=options.tol, max_iter=options.max_iter
        )
    else:
        offsets = relax(equations, options.n_iter, options.step)
        iterations, converged = int(options.n_iter), True
    offsets = _fix_gauge(xp, offsets, coarse)
    if not bool(xp.isfinite(offsets).all()):
        raise ValueError(
            f"the patch offsets overflowed: the patches hold values up to {float(xp.abs(values).max()):.3g} inside the "
            "mask, which are not phases (rad)"
        )
    hc = equations.matvec(offsets)
    relative_residual = equations.residual_norm(offsets, hc) if options.method == "lsq" else float("nan")
    if not converged:
        warnings.warn(
            f"stitching least squares stopped after {iterations} conjugate-gradient iterations at relative "
            f"residual {relative_residual:.2e} (tol={options.tol:g}); raise max_iter or tol",
            RuntimeWarning,
            stacklevel=3,
        )
    return OffsetSolution(
        offsets=offsets,
        n_pairs=graph.nnz // 2,
        energy_before=equations.energy0,
        energy_after=equations.energy(offsets, hc),
        method=options.method,
        iterations=int(iterations),
        converged=bool(converged),
        relative_residual=float(relative_residual),
        n_components=coarse.n_components,
        n_shifts=n_shift,
    )


def _fix_gauge(xp, offsets, coarse: CoarseGraph):
    """Offsets minus their mean over each connected component (warns when there is more than one component)."""
    if coarse.n_components > 1:
        warnings.warn(
            f"the overlapping patches form {coarse.n_components} disconnected groups; their relative phase offsets "
            "cannot be determined and each group is set to zero mean (check the scan, the mask and min_overlap)",
            RuntimeWarning,
            stacklevel=4,
        )
    labels = coarse.labels
    size = xp.maximum(xp.bincount(labels, minlength=coarse.n_components).astype(xp.float64), 1.0)
    mean = xp.bincount(labels, weights=offsets, minlength=coarse.n_components) / size
    return offsets - mean[labels]
