"""Detector defects and careless inputs (issue 18): each fault reconstructs like the clean data, or is refused or
warned about with a clear message. Reconstructions use the shipped model on small simulated scans and compare the
faulty data's object_phase with the clean data's over the covered area."""

import warnings

import numpy as np
import pytest

from py4dstem_deepcdi.defects import (
    check_counts_dtype,
    find_static_defects,
    fit_plane_robust,
    scan_statistics,
    transient_mask,
)
from py4dstem_deepcdi.dose import thin_counts
from py4dstem_deepcdi.models import load_pretrained
from py4dstem_deepcdi.preprocessing import preprocess
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.scan import calibrated_datacube
from py4dstem_deepcdi.simulation import simulate_dataset

FIXED = {"rotation_deg": 0.0, "transpose": False}


@pytest.fixture(scope="module")
def model():
    return load_pretrained()


@pytest.fixture(scope="module")
def clean(model):
    """A 12×12 scan at 10⁵ e⁻/pattern with the shipped model's geometry, and its reconstruction."""
    ds = simulate_dataset(model.geometry, scan_shape=(12, 12), scan_step=0.3, electrons=1e5, seed=0)
    return ds, reconstruct(ds.datacube.data, model)


def reconstruct(data: np.ndarray, model, **options) -> DeepCDIReconstruction:
    recon = DeepCDIReconstruction(calibrated_datacube(data, 0.3, 2.0), 300e3, 17.1, C10=-100.0, model=model,
                                  verbose=False, **FIXED, **options)
    return recon.preprocess().reconstruct(precision="fp32", progress=False)


def correlation(a: DeepCDIReconstruction, b: DeepCDIReconstruction) -> float:
    """Pearson correlation of two reconstructions of the same positions over their common covered area."""
    covered = (a.coverage > 0) & (b.coverage > 0)
    x, y = a.object_phase[covered], b.object_phase[covered]
    return float(np.corrcoef(x, y)[0, 1])


# ------------------------------------------------------------------ the faults, reconstructed
def test_hot_pixel_in_one_of_36_patterns(clean, model):
    ds, reference = clean
    data = ds.datacube.data.copy()
    data.reshape(-1, 32, 32)[::36, 3, 20] = 1e6  # 4 of the 144 patterns
    recon = reconstruct(data, model)
    assert correlation(recon, reference) >= 0.95
    report = recon.data.report
    assert report["transient_hot_pixels"] == 4 and report["hot_pixels"] == []
    unrepaired = reconstruct(data, model, repair=False)  # the fault is real: it ruins the image without the repair
    assert correlation(unrepaired, reference) < 0.5


@pytest.mark.parametrize("pixel", [(3, 20), (14, 17)], ids=["dark-field", "bright-field"])
def test_hot_pixel_in_every_pattern(clean, model, pixel):
    ds, reference = clean
    data = ds.datacube.data.copy()
    data[..., pixel[0], pixel[1]] += 1e3
    recon = reconstruct(data, model)
    assert correlation(recon, reference) >= 0.95
    assert recon.data.report["hot_pixels"] == [list(pixel)]


def test_dead_detector_row(clean, model):
    ds, reference = clean
    data = ds.datacube.data.copy()
    data[..., 12, :] = 0
    recon = reconstruct(data, model)
    assert correlation(recon, reference) >= 0.95
    dead = recon.data.report["dead_pixels"]
    assert dead and all(row == 12 for row, _ in dead)


@pytest.mark.filterwarnings("ignore:the dimmest 5% of the patterns")  # tested below
@pytest.mark.parametrize("kind", ["gain", "linear"])
def test_dose_drift_within_the_trained_range(clean, model, kind):
    """Half the scan at 1% gain (counts ×0.01), or a dose falling linearly to 10% over the scan (electrons lost):
    each pattern is normalised by its own electrons."""
    ds, reference = clean
    data = ds.datacube.data
    if kind == "gain":
        drifted = np.concatenate([data[:6], data[6:] * 0.01])
    else:
        drifted = np.stack([thin_counts(data[i], 1 - 0.9 * i / 11, i) for i in range(12)])
    assert correlation(reconstruct(drifted, model), reference) >= 0.95
    assert correlation(reconstruct(drifted, model, normalise="dataset"), reference) < 0.6  # the former default


def test_half_scan_at_one_percent_dose(model):
    """Half the scan thinned to 1% of 10⁶ e⁻ (10⁴ e⁻/pattern, half the trained minimum) reconstructs like the clean
    scan; from 10⁵ (10³ e⁻, 20× below what the model saw) the electrons are gone: a warning says so."""
    ds = simulate_dataset(model.geometry, scan_shape=(16, 16), scan_step=0.3, electrons=1e6, seed=0)
    data = ds.datacube.data
    half = np.concatenate([data[:8], thin_counts(data[8:], 0.01, 1)])
    with pytest.warns(UserWarning, match="dimmest 5% of the patterns: the data hold 9.88e\\+03 e⁻ per pattern"):
        recon = reconstruct(half, model)
    assert correlation(recon, reconstruct(data, model)) >= 0.95
    low = np.concatenate([data[:8], thin_counts(data[8:], 0.001, 1)])
    with pytest.warns(UserWarning, match="dimmest 5% of the patterns: .* below the 2e\\+04–1e\\+06 e⁻"):
        DeepCDIReconstruction(calibrated_datacube(low, 0.3, 2.0), 300e3, 17.1, C10=-100.0, model=model,
                              verbose=False, **FIXED).preprocess()


def test_the_report_is_printed_when_verbose(clean, model, capsys):
    ds, _ = clean
    data = ds.datacube.data.copy()
    data[..., 3, 20] += 1e3
    DeepCDIReconstruction(calibrated_datacube(data, 0.3, 2.0), 300e3, 17.1, C10=-100.0, model=model,
                          **FIXED).preprocess()
    out = capsys.readouterr().out
    assert "repaired 1 hot and 0 dead detector pixel(s) in every pattern [[3, 20]]" in out
    assert "normalised per pattern" in out and "rotation given" in out


# ------------------------------------------------------------------ careless inputs
def test_bool_complex_and_object_arrays_are_refused(clean, geometry):
    ds, _ = clean
    for bad, word in ((ds.datacube.data > 0, "boolean"), (ds.datacube.data.astype(np.complex64), "complex"),
                      (ds.datacube.data.astype(object), "object")):
        with pytest.raises(TypeError, match=word):
            preprocess(bad, geometry, scan_step=0.3, angular_sampling=2.0, **FIXED)
    check_counts_dtype(np.zeros(3, np.uint16))  # integers are counts


def test_huge_tiny_and_integer_counts_give_the_same_input(clean, model):
    """Counts ×1e35 (which overflow a float32 sum), ×1e-30, or uint16: the same network input, counts reported."""
    ds, _ = clean
    data = ds.datacube.data
    options = dict(scan_step=0.3, angular_sampling=2.0, **FIXED)
    reference = preprocess(data, model.geometry, **options)
    for factor in (1e35, 1e-30):
        scaled = preprocess((data.astype(np.float64) * factor).astype(np.float32), model.geometry, **options)
        np.testing.assert_allclose(scaled.amplitudes, reference.amplitudes, rtol=1e-4, atol=1e-5)
        assert scaled.electrons_per_pattern == pytest.approx(reference.electrons_per_pattern * factor, rel=1e-4)
    counted = preprocess(np.round(data).astype(np.uint16), model.geometry, **options)
    np.testing.assert_allclose(counted.amplitudes, reference.amplitudes, atol=1e-2)


# ------------------------------------------------------------------ the detectors, without a network
def test_no_defects_are_found_in_clean_data(model):
    """From 10² to 10⁶ e⁻/pattern no pixel of a clean scan is flagged."""
    for electrons in (1e2, 1e3, 1e4, 1e5, 1e6):
        data = simulate_dataset(model.geometry, scan_shape=(8, 8), scan_step=0.3, electrons=electrons, seed=3)
        data = data.datacube.data.astype(np.float64)
        assert not transient_mask(data).any()
        defects = find_static_defects(scan_statistics(data))
        assert not defects.mask.any(), electrons


def test_static_defects_are_classified(clean):
    ds, _ = clean
    data = ds.datacube.data.astype(np.float64)
    data[..., 20, 5] += 50.0  # a weak hot pixel: only the mean pattern shows it
    data[..., 16, 16] = 0.0  # dead in the bright field
    data[..., 30, 0:3] = 5e4  # a hot cluster at the detector's edge
    stats = scan_statistics(data)
    defects = find_static_defects(stats)
    assert sorted(map(tuple, np.argwhere(defects.hot))) == [(20, 5), (30, 0), (30, 1), (30, 2)]
    assert [tuple(p) for p in np.argwhere(defects.dead)] == [(16, 16)]


def test_robust_plane_ignores_outliers(rng):
    i, j = np.meshgrid(np.arange(10), np.arange(12), indexing="ij")
    plane = np.stack([3 + 0.5 * i - 0.2 * j, 1 - 0.1 * i + 0.3 * j], -1)
    values = plane + 0.01 * rng.standard_normal(plane.shape)
    values[0, 0] += 40.0
    values[5, 7] -= 25.0
    fitted, weights = fit_plane_robust(values)
    np.testing.assert_allclose(fitted, plane, atol=0.01)
    assert weights[0, 0] == 0 and weights[5, 7] == 0 and (weights > 0).sum() == 118
    exact, weights = fit_plane_robust(plane)  # no residual: the least-squares plane
    np.testing.assert_allclose(exact, plane, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_plane_robust(np.zeros((3, 3, 2)))
