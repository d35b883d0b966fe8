import warnings

import numpy as np
import pytest
from scipy import stats

from py4dstem_deepcdi.dose import DOSE_TOLERANCE, dose_warning, thin_counts
from py4dstem_deepcdi.models import DeepCDIModel, load_model
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.simulation import simulate_dataset


def test_thinned_poisson_counts_are_poisson_at_the_lower_dose():
    """Binomial thinning of Poisson(λ) counts gives Poisson(f·λ): mean, variance and the distribution itself."""
    rng = np.random.default_rng(0)
    lam, f = 37.0, 0.1
    counts = rng.poisson(lam, 400_000).astype(np.float32)
    thinned = thin_counts(counts, f, rng=1)
    assert thinned.dtype == np.float32 and thinned.shape == counts.shape
    assert thinned.mean() == pytest.approx(f * lam, rel=0.005)
    assert thinned.var() == pytest.approx(f * lam, rel=0.01)  # Poisson: variance = mean (a binomial would be less)
    k = np.arange(12)
    observed = np.bincount(thinned.astype(int), minlength=40)[:12]
    expected = stats.poisson.pmf(k, f * lam) * len(counts)
    chi2 = float((((observed - expected) ** 2) / expected).sum())
    assert chi2 < stats.chi2.ppf(0.999, len(k) - 1)
    assert np.all(thinned <= counts)  # electrons are only removed
    np.testing.assert_array_equal(thin_counts(counts[:100], 1.0), counts[:100])


def test_thinning_refuses_what_is_not_raw_counts():
    with pytest.raises(ValueError, match="fraction"):
        thin_counts(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="fraction"):
        thin_counts(np.ones(3), 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        thin_counts(np.array([1.0, -1.0]), 0.5)
    with pytest.raises(ValueError, match="whole electron counts"):
        thin_counts(np.array([1.0, 0.37]), 0.5)


def test_dose_warning_names_the_range():
    assert dose_warning(1e5, (2e4, 1e6)) is None
    assert dose_warning(2e4 / DOSE_TOLERANCE * 1.001, (2e4, 1e6)) is None
    assert dose_warning(1e5, None) is None
    message = dose_warning(1e3, (2e4, 1e6))
    assert "1e+03 e⁻ per pattern, below the 2e+04–1e+06" in message and "--electrons" in message
    assert "above" in dose_warning(1e7, (2e4, 1e6))


def test_model_file_carries_its_dose_range_and_the_reconstruction_checks_it(tmp_path, geometry):
    metadata = {"name": "tiny", "training_set": {"electrons_range": [2e4, 1e6]}}
    path = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, metadata).save(tmp_path / "tiny.pt")
    model = load_model(path)
    assert model.electrons_range == (2e4, 1e6)
    assert DeepCDIModel(ResUNet(width=0.125, depth=2), geometry, {}).electrons_range is None
    args = dict(energy=300e3, semiangle_cutoff=17.1, model=model, rotation_deg=0, transpose=False, verbose=False,
                **geometry.aberrations)
    for electrons, warns in ((1e5, False), (1e3, True)):
        ds = simulate_dataset(geometry, scan_shape=(4, 4), scan_step=0.3, electrons=electrons, seed=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DeepCDIReconstruction(ds.datacube, **args).preprocess()
        dose = [w for w in caught if "e⁻ per pattern" in str(w.message)]
        assert bool(dose) == warns, [str(w.message) for w in caught]
