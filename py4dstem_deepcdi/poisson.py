"""Exact Poisson sampling of detector counts, fast on the CPU.

``torch.poisson`` draws element by element on the CPU with a slow method for small means, which dominate diffraction
patterns (most pixels see a few electrons); :func:`poisson` finds those counts by table-guided inversion instead.
"""

from __future__ import annotations

import torch

_TABLE_RATE = 16.0  # rates below: inversion guided by tables; from here on: torch.poisson (transformed rejection)
_RATE_CELLS = 1024  # λ cells of 1/64 (λ·64 is exact in float32)
_UNIFORM_BITS = 10  # uniform cells of 2^-10
_K_MAX = 64  # F(63; 16) = 1 - 1e-20: no count below λ = 16 reaches it
_TABLES: dict[str, torch.Tensor] = {}


def _poisson_tables() -> dict[str, torch.Tensor]:
    """The tables of the CPU Poisson sampler, built once.

    ``cell`` (int8, row-major (λ cell, u cell)): the count ``min{k: u < F(k; λ)}`` where it is the same all over
    the cell; where it is not, ``-2 - k_lo`` with ``k_lo`` its smallest value; -1 in the last row (λ >= 16).
    ``cdf`` (float64, (λ cell edge, k)): F(k; λ) at the cell edges. ``log_factorial``: log k!.
    """
    if not _TABLES:
        rate = torch.arange(_RATE_CELLS + 1, dtype=torch.float64) * (_TABLE_RATE / _RATE_CELLS)  # cell edges
        k = torch.arange(_K_MAX, dtype=torch.float64)
        log_factorial = torch.lgamma(k + 1)
        cdf = torch.exp(-rate[:, None] + k * torch.log(rate[:, None].clamp_min(1e-300)) - log_factorial).cumsum(1)
        cdf[0] = 1.0  # λ = 0
        u = torch.arange(2**_UNIFORM_BITS + 1, dtype=torch.float64) / 2**_UNIFORM_BITS
        quantile = torch.searchsorted(cdf, u.expand(_RATE_CELLS + 1, -1).contiguous(), right=True)
        # the quantile grows with λ and u: it is one value over a cell if the cell's extreme corners agree
        low, high = quantile[:-1, :-1], quantile[1:, 1:]
        cell = torch.where(low == high, low, -2 - low)
        cell = torch.cat([cell, torch.full((1, 2**_UNIFORM_BITS), -1, dtype=cell.dtype)])
        _TABLES.update(cell=cell.to(torch.int8).flatten(), cdf=cdf.flatten(), log_factorial=log_factorial)
    return _TABLES


def _poisson_ambiguous(rate: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``min{k: u < F(k; λ)}`` for λ < 16, from a lower bound ``k`` of it (float64 throughout).

    ``F(j; λ) = F(j; λ0) - ∫ pmf(j; t) dt`` over [λ0, λ], λ0 the lower edge of λ's cell, where the integrand is
    monotone: ``F(j; λ)`` lies between the tabulated ``F(j; λ0)`` minus (λ - λ0) times the larger or the smaller
    end value. Two such steps up from ``k`` decide almost all; the few others sum the probabilities.
    """
    tables = _poisson_tables()
    lam, u, k = rate.double(), u.double(), k.double()
    row = torch.floor(lam * (_RATE_CELLS / _TABLE_RATE))
    lam0 = row * (_TABLE_RATE / _RATE_CELLS)
    log_lam, log_lam0 = lam.clamp_min(1e-300).log(), lam0.clamp_min(1e-300).log()
    state = (k, lam, lam0, log_lam, log_lam0, row, u)
    todo = None  # the elements still counting up (None: all)
    unsure = []
    for _ in range(2):
        j, lj, lj0, log_lj, log_lj0, rj, uj = state if todo is None else (t.index_select(0, todo) for t in state)
        log_f = tables["log_factorial"].index_select(0, j.long())
        p0, p1 = torch.exp(j * log_lj0 - lj0 - log_f), torch.exp(j * log_lj - lj - log_f)
        f0 = tables["cdf"].index_select(0, (rj * _K_MAX + j).long())
        high = f0 - (lj - lj0) * torch.minimum(p0, p1) + 1e-12
        low = f0 - (lj - lj0) * torch.maximum(p0, p1) - 1e-12
        above = high <= uj  # F(j; λ) <= u for sure: the count is above j
        maybe, above = (~above & (low <= uj)).nonzero().flatten(), above.nonzero().flatten()
        unsure.append(maybe if todo is None else todo.index_select(0, maybe))
        todo = above if todo is None else todo.index_select(0, above)
        k.index_add_(0, todo, torch.ones_like(todo, dtype=k.dtype))
    todo = torch.cat([*unsure, todo])  # undecided, or still counting up
    if len(todo):
        i = torch.arange(_K_MAX, dtype=torch.float64)
        lt = lam.index_select(0, todo)[:, None]
        cdf = torch.exp(i * lt.clamp_min(1e-300).log() - lt - tables["log_factorial"]).cumsum(1)
        k.index_copy_(0, todo, (cdf <= u.index_select(0, todo)[:, None]).sum(1).double())
    return k


def poisson(rate: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson counts with means ``rate`` (>= 0, any shape), float32 of ``rate``'s shape, exact.

    On a GPU: ``torch.poisson``. On the CPU: counts below λ = 16 by inversion, ``min{k: u < F(k; λ)}``, read from a
    table of (λ, u) cells where the cell decides ``k`` and bracketed from tabulated F where it does not;
    ``torch.poisson`` (Hörmann's transformed rejection) draws the rest. The draws consume ``generator`` in a fixed
    order, so a seeded generator gives the same counts every time.
    """
    if rate.device.type != "cpu":
        return torch.poisson(rate, generator=generator)
    tables = _poisson_tables()
    flat = rate.reshape(-1).float()
    m = flat.numel()
    # the uniforms' top 10 bits pick the cell: three from each 31-bit random number
    third = -(-m // 3)
    bits = torch.empty(third, dtype=torch.int32).random_(generator=generator)
    top = torch.empty(3, third, dtype=torch.int32)
    torch.bitwise_right_shift(bits, 21, out=top[0])
    torch.bitwise_right_shift(bits, 11, out=top[1]).bitwise_and_(1023)
    torch.bitwise_right_shift(bits, 1, out=top[2]).bitwise_and_(1023)
    top = top.flatten()[:m]
    cell = (flat * (_RATE_CELLS / _TABLE_RATE)).clamp_(max=_RATE_CELLS).to(torch.int32).mul_(2**_UNIFORM_BITS)
    quantile = tables["cell"].index_select(0, cell.add_(top))
    out = quantile.to(torch.float32)
    rest = (quantile < 0).nonzero().flatten()
    if len(rest):
        code = quantile.index_select(0, rest)
        large = code == -1
        big, small = rest.index_select(0, large.nonzero().flatten()), (~large).nonzero().flatten()
        if len(big):
            out.index_copy_(0, big, torch.poisson(flat.index_select(0, big), generator=generator))
        if len(small):
            k_lo = (-2 - code.index_select(0, small)).double()
            small = rest.index_select(0, small)
            # the rest of the uniform: 14 more bits
            low = torch.empty(len(small), dtype=torch.int32).random_(generator=generator).bitwise_right_shift_(17)
            u = top.index_select(0, small).double().mul_(2.0**14).add_(low).mul_(2.0**-24)
            out.index_copy_(0, small, _poisson_ambiguous(flat.index_select(0, small), u, k_lo).float())
    return out.reshape(rate.shape)
