"""Array-module helpers shared by the stitching modules: one code path for numpy and CuPy (``xp``)."""

from __future__ import annotations

import inspect

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from ..backend import asnumpy


def is_numpy(xp) -> bool:
    """Whether ``xp`` is numpy (else CuPy)."""
    return xp is np


def sparse_modules(xp):
    """``(sparse, sparse.linalg)`` of SciPy for numpy, of ``cupyx.scipy`` for CuPy."""
    if is_numpy(xp):
        return scipy.sparse, scipy.sparse.linalg
    # optional GPU module: imported only when a CuPy array module was asked for
    import cupyx.scipy.sparse as sps  # noqa: PLC0415  # pragma: no cover - needs a GPU
    import cupyx.scipy.sparse.linalg as spla  # noqa: PLC0415  # pragma: no cover

    return sps, spla  # pragma: no cover


def to_float(value) -> float:
    """A 0-d numpy/CuPy value as a Python float (a device-to-host copy for CuPy)."""
    return float(asnumpy(value))


def repeat(xp, values, counts):
    """``numpy.repeat(values, counts, axis=0)`` for numpy and CuPy (CuPy's repeat takes no array of counts)."""
    if is_numpy(xp):
        return np.repeat(values, counts, axis=0)
    ends = xp.cumsum(counts)  # pragma: no cover - needs a GPU
    total = int(ends[-1]) if ends.size else 0  # pragma: no cover
    idx = xp.searchsorted(ends, xp.arange(total, dtype=ends.dtype), side="right")  # pragma: no cover
    return values[idx]  # pragma: no cover


def row_sums(xp, values, indptr, n_rows: int):
    """Sum ``values`` (one per stored entry of a CSR layout with row pointers ``indptr``) over each row."""
    if is_numpy(xp):
        out = np.zeros(n_rows, dtype=np.float64)
        nonempty = indptr[1:] > indptr[:-1]
        if values.size:
            out[nonempty] = np.add.reduceat(values, indptr[:-1][nonempty])
        return out
    rows = repeat(xp, xp.arange(n_rows), indptr[1:] - indptr[:-1])  # pragma: no cover - needs a GPU
    return xp.bincount(rows, weights=values, minlength=n_rows)  # pragma: no cover


def conjugate_gradients(xp, matvec, precondition, rhs, *, tol: float, max_iter: int):
    """Solve ``H x = rhs`` (``H`` symmetric positive semi-definite) by preconditioned conjugate gradients from 0.

    Calls ``scipy.sparse.linalg.cg`` for numpy and ``cupyx.scipy.sparse.linalg.cg`` for CuPy, with ``matvec``
    (``x -> H x``) and ``precondition`` (``r -> M r``, ``M`` an approximate inverse of ``H``) wrapped as linear
    operators. Stops when ``|rhs - H x| <= tol * |rhs|`` (the recursively updated residual) or after ``max_iter``
    iterations; SciPy before 1.12 and CuPy name the relative tolerance ``tol``, later SciPy ``rtol``.

    Returns
    -------
    x, iterations, converged
        The solution (float64, like ``rhs``), the number of iterations run and whether the tolerance was reached.
    """
    _, spla = sparse_modules(xp)
    n = int(rhs.shape[0])
    operator = spla.LinearOperator((n, n), matvec=matvec, dtype=rhs.dtype)
    preconditioner = spla.LinearOperator((n, n), matvec=precondition, dtype=rhs.dtype)
    counter = [0]

    def count(_x):
        counter[0] += 1

    tolerance = {_tolerance_keyword(spla.cg): float(tol)}
    x, info = spla.cg(operator, rhs, M=preconditioner, maxiter=int(max_iter), atol=0.0, callback=count, **tolerance)
    return x, counter[0], info == 0


def _tolerance_keyword(cg) -> str:
    return "rtol" if "rtol" in inspect.signature(cg).parameters else "tol"
