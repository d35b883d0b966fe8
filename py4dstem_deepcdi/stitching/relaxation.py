"""The paper's relaxation of Eq. 2: damped Jacobi sweeps towards agreement with the neighbours."""

from __future__ import annotations

from .equations import NormalEquations


def relax(equations: NormalEquations, n_iter: int, step: float):
    """Offsets after ``n_iter`` sweeps of ``c_i <- c_i - step * mean_{j ~ i} (m_ij + c_i - c_j)`` from ``c = 0``.

    All patches move at once (Jacobi), each a fraction ``step`` of the way towards agreement with its
    neighbours; ``mean_j r_ij = (H c - g)_i / deg_i``. A patch without neighbours keeps offset 0.

    Parameters
    ----------
    equations:
        The :class:`~.equations.NormalEquations` of the pair graph.
    n_iter:
        Number of sweeps (the paper: 3).
    step:
        Fraction in (0, 1] of the mean mismatch removed per sweep (the paper: 0.1).

    Returns
    -------
    ``(J,)`` float64 offsets (rad), ``xp`` like the equations.
    """
    xp = equations.xp
    inverse_degree = 1.0 / xp.maximum(equations.degree, 1.0)
    offsets = xp.zeros_like(equations.rhs)
    for _ in range(int(n_iter)):
        offsets -= step * inverse_degree * (equations.matvec(offsets) - equations.rhs)
    return offsets
