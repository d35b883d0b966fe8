"""Array helpers: repeat and row sums, and the conjugate-gradient call with either tolerance keyword."""

import numpy as np
import pytest
import scipy.sparse.linalg

from py4dstem_deepcdi.stitching import arrays
from py4dstem_deepcdi.stitching.arrays import conjugate_gradients, repeat, row_sums


def test_repeat_and_row_sums():
    np.testing.assert_array_equal(repeat(np, np.array([4, 5, 6]), np.array([2, 0, 1])), [4, 4, 6])
    indptr = np.array([0, 2, 2, 5])
    np.testing.assert_allclose(row_sums(np, np.array([1.0, 2.0, 3.0, 4.0, 5.0]), indptr, 3), [3.0, 0.0, 12.0])


def _spd(rng, n=30):
    a = rng.standard_normal((n, n))
    return a @ a.T + n * np.eye(n)


def test_conjugate_gradients_solves_and_counts(rng):
    mat = _spd(rng)
    b = rng.standard_normal(len(mat))
    diag = np.diag(mat)
    x, iterations, converged = conjugate_gradients(np, lambda v: mat @ v, lambda r: r / diag, b, tol=1e-12,
                                                   max_iter=200)
    assert converged and 0 < iterations <= 30
    np.testing.assert_allclose(x, np.linalg.solve(mat, b), rtol=1e-9)
    x, iterations, converged = conjugate_gradients(np, lambda v: mat @ v, lambda r: r, b, tol=1e-12, max_iter=3)
    assert not converged and iterations == 3


@pytest.mark.parametrize("keyword", ["rtol", "tol"])
def test_either_tolerance_keyword_is_used(monkeypatch, rng, keyword):
    """SciPy >= 1.12 names the relative tolerance rtol, SciPy 1.10-1.11 and CuPy tol."""
    seen = {}
    real_cg = scipy.sparse.linalg.cg

    def cg_rtol(A, b, x0=None, *, rtol=1e-5, atol=0.0, maxiter=None, M=None, callback=None):
        seen["rtol"] = rtol
        return real_cg(A, b, rtol=rtol, atol=atol, maxiter=maxiter, M=M, callback=callback)

    def cg_tol(A, b, x0=None, tol=1e-5, maxiter=None, M=None, callback=None, atol=None):
        seen["tol"] = tol
        return real_cg(A, b, rtol=tol, atol=atol, maxiter=maxiter, M=M, callback=callback)

    monkeypatch.setattr(scipy.sparse.linalg, "cg", cg_rtol if keyword == "rtol" else cg_tol)
    mat = _spd(rng, 10)
    x, _, converged = arrays.conjugate_gradients(np, lambda v: mat @ v, lambda r: r, np.ones(10), tol=1e-9,
                                                 max_iter=100)
    assert converged and seen == {keyword: 1e-9}
    np.testing.assert_allclose(mat @ x, 1.0, rtol=1e-7)
