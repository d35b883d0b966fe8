import numpy as np
import pytest
import torch
from scipy import stats

from py4dstem_deepcdi.poisson import _K_MAX, _poisson_ambiguous, _poisson_tables, poisson
from py4dstem_deepcdi.seeds import seed_for


def test_cpu_poisson_sampler_is_exact_inversion():
    # below λ = 16 the sampler returns min{k: u < F(k; λ)} for its uniform u: compare with a direct float64 inversion
    tables = _poisson_tables()
    g = torch.Generator().manual_seed(2)
    m = 200_000
    lam = torch.rand(m, generator=g) * 16
    lam[:1024] = torch.arange(1024) / 64.0  # the cell edges
    u24 = torch.randint(0, 2**24, (m,), generator=g)
    cell = (lam * 64).to(torch.int64) * 1024 + (u24 >> 14)
    code = tables["cell"][cell].long()
    u = u24.double() * 2.0**-24
    k = code.double()
    ambiguous = code <= -2
    assert 0 < float(ambiguous.double().mean()) < 0.06
    k[ambiguous] = _poisson_ambiguous(lam[ambiguous], u[ambiguous], (-2 - code[ambiguous]).double())
    i = torch.arange(_K_MAX, dtype=torch.float64)
    log_pmf = i * lam.double()[:, None].clamp_min(1e-300).log() - lam.double()[:, None] - torch.lgamma(i + 1)
    expected = (torch.exp(log_pmf).cumsum(1) <= u[:, None]).sum(1).double()
    assert torch.equal(k, expected)


@pytest.mark.parametrize("lam", [0.0, 0.002, 0.7, 5.3, 15.99, 16.0, 140.0, 5000.0])
def test_cpu_poisson_counts_follow_the_poisson_law(lam):
    counts = poisson(torch.full((400_000,), lam), torch.Generator().manual_seed(3)).numpy()
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    if lam == 0:
        assert counts.max() == 0
        return
    values, observed = np.unique(counts.astype(int), return_counts=True)
    expected = stats.poisson.pmf(values, lam) * len(counts)
    keep = expected > 20
    chi2 = (((observed - expected) ** 2 / expected)[keep]).sum()
    assert stats.chi2.sf(chi2, max(keep.sum() - 1, 1)) > 1e-4
    assert counts.mean() == pytest.approx(lam, abs=5 * np.sqrt(lam / len(counts)))
    assert counts.var() == pytest.approx(lam, rel=5 * np.sqrt(1 / (lam * len(counts)) + 2 / len(counts)))


def test_poisson_keeps_the_shape_and_is_reproducible():
    rate = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(0)) * 40  # both sides of λ = 16
    a = poisson(rate, torch.Generator().manual_seed(1))
    assert a.shape == rate.shape and a.dtype == torch.float32
    assert torch.equal(a, poisson(rate, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, poisson(rate, torch.Generator().manual_seed(2)))


def test_seed_for_differs_between_tuples():
    seeds = {seed_for(s, w, k) for s in range(3) for w in range(3) for k in range(-1, 20)}
    assert len(seeds) == 3 * 3 * 21
    assert all(0 <= s < 2**63 for s in seeds)
    assert seed_for(7, 1, 5) == seed_for(7, 1, 5)
