import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from py4dstem_deepcdi.ramp import anchor_ramp, com_phase_gradients, probe_weighted_gradients
from py4dstem_deepcdi.simulation import ForwardModel, simulate_dataset


def smooth_object(shape, rng, sigma=3.0, peak=0.5):
    phase = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return peak * phase / np.abs(phase).max()


def test_centre_of_mass_of_a_phase_ramp_is_its_gradient(geometry):
    """A linear phase a·r0 + b·r1 tilts the beam: the pattern's centre of mass moves by N·(a, b)/2π pixels."""
    n = geometry.detector_shape[0]
    rows, cols = np.indices(geometry.detector_shape, dtype=np.float64)
    reference = np.abs(geometry.probe_fourier) ** 2
    model = ForwardModel(geometry)
    for a, b in [(2 * math.pi * 0.7 / n, 0.0), (-2 * math.pi * 1.3 / n, 2 * math.pi * 0.4 / n)]:
        phase = torch.as_tensor(a * rows + b * cols, dtype=torch.float32)[None]
        intensity = model.intensity(phase).numpy()
        # within 1%: the probe's tails reach the window's edge, where a non-periodic ramp wraps
        np.testing.assert_allclose(com_phase_gradients(intensity, reference)[0], [a, b], rtol=0.01, atol=1e-5)


def test_centre_of_mass_is_the_probe_weighted_gradient_of_any_thin_object(geometry, rng):
    """Ehrenfest's theorem on the package's own forward model: CoM shift = |P|²-weighted mean of ∇φ."""
    phase = smooth_object((80, 80), rng)
    ds = simulate_dataset(geometry, scan_shape=(12, 12), scan_step=0.6, phase=phase, noise=False)
    patterns = np.asarray(ds.datacube.data, dtype=np.float64).reshape(-1, *geometry.detector_shape)
    measured = com_phase_gradients(patterns, np.abs(geometry.probe_fourier) ** 2)
    truth, valid = probe_weighted_gradients(phase, ds.positions / ds.sampling, np.abs(geometry.probe) ** 2)
    assert valid.all()
    for axis in (0, 1):
        slope = np.polyfit(truth[:, axis], measured[:, axis], 1)[0]
        assert slope == pytest.approx(1.0, abs=0.05)
        assert np.corrcoef(truth[:, axis], measured[:, axis])[0, 1] > 0.97
    # amplitudes (the network input) give the same gradients as intensities
    np.testing.assert_allclose(
        com_phase_gradients(np.sqrt(patterns), np.abs(geometry.probe_fourier) ** 2, amplitudes=True),
        measured,
        atol=1e-12,
    )


def test_probe_weighted_gradients_match_a_direct_sum(rng):
    weight = np.zeros((8, 8))
    weight[2:7, 1:6] = rng.random((5, 5))
    image = rng.standard_normal((30, 34))
    image[:3] = np.nan  # not stitched there
    centres = np.array([[10, 12], [20, 25], [15.0, 9.0], [4, 20]])
    gradients, valid = probe_weighted_gradients(image, centres, weight)
    d0 = np.diff(image, axis=0)
    d1 = np.diff(image, axis=1)
    w0 = 0.5 * (weight[1:] + weight[:-1])
    w1 = 0.5 * (weight[:, 1:] + weight[:, :-1])
    for j, (r, c) in enumerate(centres.astype(int)):
        top, left = r - 4, c - 4
        g0 = d0[top : top + 7, left : left + 8]
        g1 = d1[top : top + 8, left : left + 7]
        ok0, ok1 = np.isfinite(g0), np.isfinite(g1)
        expected = [
            (np.where(ok0, g0, 0) * w0).sum() / (w0 * ok0).sum(),
            (np.where(ok1, g1, 0) * w1).sum() / (w1 * ok1).sum(),
        ]
        if valid[j]:
            np.testing.assert_allclose(gradients[j], expected, rtol=1e-9, atol=1e-12)
    assert valid.tolist() == [True, True, True, False]  # the last probe lies partly on the NaN rows


def test_plane_has_its_gradient_everywhere_even_between_pixels(rng):
    rows, cols = np.indices((40, 40), dtype=np.float64)
    plane = 0.03 * rows - 0.011 * cols
    centres = rng.uniform(12, 28, size=(20, 2))
    gradients, valid = probe_weighted_gradients(plane, centres, rng.random((9, 9)))
    assert valid.all()
    np.testing.assert_allclose(gradients, np.broadcast_to([0.03, -0.011], gradients.shape), atol=1e-12)


def test_anchor_ramp_removes_a_spurious_plane_and_keeps_the_rest(geometry, rng):
    truth = smooth_object((90, 90), rng)
    truth[:6] = np.nan
    weight = np.abs(geometry.probe) ** 2
    centres = np.stack(np.meshgrid(np.arange(25, 66, 2.5), np.arange(25, 66, 2.5), indexing="ij"), -1).reshape(-1, 2)
    measured, _ = probe_weighted_gradients(truth, centres, weight)
    rows, cols = np.indices(truth.shape, dtype=np.float64)
    image = truth + 0.02 * rows - 0.005 * cols + 0.3
    anchored, removed = anchor_ramp(image, centres, weight, measured)
    np.testing.assert_allclose(removed, [0.02, -0.005], atol=1e-12)
    finite = np.isfinite(truth)
    difference = anchored[finite] - truth[finite]  # a constant: the image's mean is kept
    np.testing.assert_allclose(difference, np.nanmean(image) - np.nanmean(truth), atol=1e-10)
    assert np.isnan(anchored[:6]).all()
    assert np.nanmean(anchored) == pytest.approx(np.nanmean(image))


def test_bad_input_is_named(geometry):
    reference = np.abs(geometry.probe_fourier) ** 2
    with pytest.raises(ValueError, match="detector shape"):
        com_phase_gradients(np.ones((3, 16, 16)), reference)
    with pytest.raises(ValueError, match="no counts"):
        com_phase_gradients(np.zeros((2, 32, 32)), reference)
    with pytest.raises(ValueError, match="differ in shape"):
        anchor_ramp(np.zeros((40, 40)), np.zeros((3, 2)), np.ones((8, 8)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="inside the stitched image"):
        anchor_ramp(np.full((40, 40), np.nan), np.full((3, 2), 20.0), np.ones((8, 8)), np.zeros((3, 2)))
