"""Scores of two images on one grid (comparison/metrics.py)."""

import math

import numpy as np
import pytest

from py4dstem_deepcdi.comparison.metrics import (
    fitted_rms,
    format_resolution,
    image_frc,
    phase_correlation,
    phase_scale,
    remove_background,
    score_against_truth,
)


def test_frc_of_an_image_with_itself_and_with_independent_noise(rng):
    image = rng.normal(size=(64, 64))
    same = image_frc(image, image, (0.3, 0.3))
    np.testing.assert_allclose(same["frc"][1:], 1.0, atol=1e-9)
    assert np.isnan(same["resolution_A"]["0.143"])  # never falls below: resolution limited by the pixel size
    assert same["q"].max() == pytest.approx(1 / (2 * 0.3), rel=0.1)  # up to Nyquist, in Å⁻¹
    noise = image_frc(image, rng.normal(size=(64, 64)), (0.3, 0.3))
    assert abs(float(np.mean(noise["frc"][2:]))) < 0.05
    assert float(np.max(np.abs(noise["frc"][4:]))) < 0.5


def test_remove_background_and_correlation(rng):
    i, j = np.meshgrid(np.arange(20), np.arange(30), indexing="ij")
    image = rng.normal(size=(20, 30))
    ramped = image + 3.0 + 0.5 * i - 0.3 * j
    assert phase_correlation(remove_background(ramped, ramp=True), image) > 0.99
    assert phase_correlation(remove_background(ramped), image) < 0.5
    assert phase_correlation(image, 2 * image + 1) == pytest.approx(1.0)


def test_remove_background_numbers():
    i, j = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    plane = 2.0 + 0.5 * i - 0.25 * j
    np.testing.assert_allclose(remove_background(plane, ramp=True), 0.0, atol=1e-12)
    flat = remove_background(plane)
    assert flat.dtype == np.float64 and flat.mean() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(flat, plane - plane.mean())


def test_correlation_of_anticorrelated_and_constant_images(rng):
    image = rng.normal(size=(16, 16))
    assert phase_correlation(image, -3 * image + 2) == pytest.approx(-1.0)
    assert math.isnan(phase_correlation(image, np.ones_like(image)))


def test_fitted_rms_and_phase_scale(rng):
    truth = rng.normal(size=(32, 32))
    # a weak, offset copy: the scale is its contrast, the fitted RMS is zero (scale and offset explain it)
    weak = 0.5 * truth + 1.0
    assert phase_scale(weak, truth) == pytest.approx(0.5)
    assert fitted_rms(weak, truth) == pytest.approx(0.0, abs=1e-12)
    # independent noise of standard deviation 0.1 added: RMS ≈ 0.1 × (the fitted scale's share) ≈ 0.1
    noise = rng.normal(scale=0.1, size=truth.shape)
    assert fitted_rms(truth + noise, truth) == pytest.approx(0.1, rel=0.1)
    assert phase_scale(truth + noise, truth) == pytest.approx(1.0, abs=0.02)
    assert math.isnan(phase_scale(truth, np.zeros_like(truth)))


def test_score_against_truth_bundles_the_scores(rng):
    truth = rng.normal(size=(32, 32))
    image = 0.8 * truth + rng.normal(scale=0.05, size=truth.shape)
    s = score_against_truth(image, truth, (0.2, 0.2))
    assert s["correlation"] == pytest.approx(phase_correlation(image, truth))
    assert s["rms_rad"] == pytest.approx(fitted_rms(image, truth))
    assert s["phase_scale"] == pytest.approx(0.8, abs=0.02)
    assert s["resolution_A"] == s["frc"]["resolution_A"]
    assert set(s["frc"]) == {"q", "frc", "half_bit", "n_per_ring", "resolution_A"}


def test_format_resolution():
    assert format_resolution(1.2345, (0.2, 0.25)) == "1.23 Å"
    assert format_resolution(float("nan"), (0.2, 0.25)) == "≤ 0.5 Å (Nyquist: no crossing)"
