"""Fourier ring correlation, thresholds and sub-pixel registration."""

import inspect
import math

import matplotlib
import numpy as np
import pytest
from py4DSTEM.process.phase.utils import fourier_ring_correlation as p4_frc

from py4dstem_deepcdi.frc import (
    FRCResult,
    fourier_ring_correlation,
    half_bit_threshold,
    register_images,
)


def smooth_image(rng, shape, sigma=2.5):
    """Gaussian-filtered white noise (FFT, periodic)."""
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.fftfreq(shape[1])[None, :]
    spec = np.fft.fft2(rng.standard_normal(shape)) * np.exp(-2 * (math.pi * sigma) ** 2 * (ky**2 + kx**2))
    return np.real(np.fft.ifft2(spec))


def fourier_shift(img, shift):
    """out(r) = img(r - shift), periodic."""
    ky = np.fft.fftfreq(img.shape[0])[:, None]
    kx = np.fft.fftfreq(img.shape[1])[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(img) * np.exp(-2j * math.pi * (ky * shift[0] + kx * shift[1]))))


def test_self_frc_is_one_on_every_ring(rng):
    img = smooth_image(rng, (96, 96)) + 3.0
    raw = fourier_ring_correlation(img, img, 0.25, apodize=False)
    assert isinstance(raw, FRCResult)
    np.testing.assert_allclose(raw.frc, 1.0, atol=1e-12)  # including the DC ring
    apo = fourier_ring_correlation(img, img, 0.25)
    assert np.isnan(apo.frc[0])  # means removed by the apodisation: no DC information
    np.testing.assert_allclose(apo.frc[1:], 1.0, atol=1e-12)
    # never below any threshold: no crossing up to Nyquist -> NaN
    assert all(math.isnan(v) for v in apo.resolutions.values())
    # rings: centred on k / (N * pixel) up to Nyquist (0.5 / pixel)
    np.testing.assert_allclose(apo.q, np.arange(49) / (96 * 0.25))
    assert apo.q[-1] == pytest.approx(0.5 / 0.25)


def test_independent_noise_stays_near_zero(rng):
    a, b = rng.standard_normal((2, 128, 128))
    res = fourier_ring_correlation(a, b, 1.0)
    k = np.arange(len(res.q)) >= 3
    assert np.all(np.abs(res.frc[k]) < 4.0 / np.sqrt(res.n_per_ring[k]))
    # no correlation at all: below every threshold already at the first ring -> the field-of-view value 1 / q[1]
    assert res.resolution(0.143) == pytest.approx(1.0 / res.q[1])


def test_half_bit_curve():
    n = np.array([0, 1, 2, 8, 100, 1e6])
    t = half_bit_threshold(n)
    assert math.isnan(t[0])
    assert t[1] == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.diff(t[1:]) < 0) and t[-1] == pytest.approx(0.2071 / 1.2071, abs=2e-3)
    # on real rings (n > 1 beyond DC) it stays below 1, unlike py4DSTEM's 2 / sqrt(n / 2)
    res = fourier_ring_correlation(np.eye(32), np.eye(32), 1.0, apodize=False)
    assert res.n_per_ring[0] == 1 and res.half_bit[0] == pytest.approx(1.0, abs=1e-4)
    assert np.all(res.half_bit[1:] < 1.0)


def test_resolution_interpolates_and_skips_the_dc_ring():
    q = np.arange(11) * 0.1
    frc = np.linspace(1.0, 0.0, 11)
    frc[0] = 0.0  # a DC ring below the threshold must not stop the search at q[0]
    res = FRCResult(q=q, frc=frc, half_bit=np.full(11, 0.2), n_per_ring=np.full(11, 50.0), pixel_size=(1.0, 1.0),
                    shape=(20, 20))
    # 1 - q crosses 0.5 at q = 0.5 exactly, 0.143 at q = 0.857
    assert res.resolution(0.5) == pytest.approx(1 / 0.5)
    assert res.resolution(0.143) == pytest.approx(1 / 0.857)
    assert res.resolution("half_bit") == pytest.approx(1 / 0.8)
    assert res.resolutions == {"0.5": res.resolution(0.5), "0.143": res.resolution(0.143),
                               "half_bit": res.resolution("half-bit")}
    res.frc[4] = np.nan  # empty rings are skipped
    assert res.resolution(0.5) == pytest.approx(1 / 0.5)
    with pytest.raises(ValueError, match="threshold"):
        res.resolution("one-bit")
    with pytest.raises(ValueError, match="threshold"):
        res.resolution(1.5)


def test_known_resolution_of_a_low_pass_copy(rng):
    """White noise vs. a copy low-pass filtered at q_c plus weak noise: the curve drops at q_c.

    The images are periodic, so without apodisation the drop is sharp (within a ring of q_c). The Tukey window
    convolves the spectrum with its transform and smears the edge by a couple of rings (dq = 1 / (N px)).
    """
    n, px = 256, 0.5
    dq = 1 / (n * px)
    img = rng.standard_normal((n, n))
    qy = np.fft.fftfreq(n, px)[:, None]
    qx = np.fft.fftfreq(n, px)[None, :]
    for q_c in (0.4, 0.7):
        low = np.real(np.fft.ifft2(np.fft.fft2(img) * (np.hypot(qy, qx) < q_c)))
        copy = low + 0.05 * rng.standard_normal((n, n))
        sharp = fourier_ring_correlation(img, copy, px, apodize=False)
        for threshold in (0.5, 0.143, "half_bit"):
            assert abs(1 / sharp.resolution(threshold) - q_c) < 1.0 * dq
        res = fourier_ring_correlation(img, copy, px)
        assert abs(1 / res.resolution(0.143) - q_c) < 3.0 * dq
        assert res.resolution(0.143) == pytest.approx(1 / q_c, rel=0.05)
        below = res.q < 0.9 * q_c
        assert np.all(res.frc[below][1:] > 0.9)  # ring 0 is NaN (apodised)


def test_agrees_with_py4dstem_without_apodisation(rng):
    matplotlib.use("Agg")

    params = inspect.signature(p4_frc).parameters
    assert {"image_1", "image_2", "pixel_size", "bin_size", "plot_frc"} <= set(params)
    for shape in ((64, 64), (64, 96)):
        a = rng.standard_normal(shape)
        b = 0.7 * a + rng.standard_normal(shape)
        px = 0.4
        # py4DSTEM: pixel_size is a (row, col) pair; its default bin is the spacing of the second axis,
        # it splits each Fourier pixel linearly between two rings and drops the DC ring
        q_p4, frc_p4, half_p4 = p4_frc(a, b, pixel_size=(px, px), plot_frc=False)
        q_p4, frc_p4, half_p4 = (np.asarray(v) for v in (q_p4, frc_p4, half_p4))
        bin_width = (1 / (shape[1] * px)) / max(1 / (shape[0] * px), 1 / (shape[1] * px))
        ours = fourier_ring_correlation(a, b, px, apodize=False, binning="linear", bin_width=bin_width)
        m = min(len(q_p4), len(ours.q) - 1)
        assert m > 20
        np.testing.assert_allclose(ours.q[1 : m + 1], q_p4[:m], rtol=1e-6)  # py4DSTEM uses float32 frequencies
        np.testing.assert_allclose(ours.frc[1 : m + 1], frc_p4[:m], atol=1e-5)
    # py4DSTEM's half-bit curve 2 / sqrt(n / 2) exceeds 1 on its first rings; ours does not
    assert half_p4[0] > 1.0 and np.all(ours.half_bit[1:] < 1.0)


def test_registration_recovers_a_subpixel_shift(rng):
    big = smooth_image(rng, (320, 320), sigma=3.0)
    for shift in (np.array([3.37, -1.71]), np.array([-0.42, 5.08])):
        moved = fourier_shift(big, shift)
        a = big[60:260, 40:240]  # non-periodic crops of the same scene
        b = moved[60:260, 40:240] + 0.02 * big.std() * rng.standard_normal((200, 200))
        reg = register_images(a, b)
        assert reg.shift.shape == (2,)
        assert np.abs(reg.shift - shift).max() < 0.05
        # the aligned image overlays the reference away from the wrapped border
        inner = (slice(10, -10), slice(10, -10))
        assert np.abs(reg.aligned[inner] - a[inner]).max() < 0.2 * np.ptp(a)
        assert np.corrcoef(reg.aligned[inner].ravel(), a[inner].ravel())[0, 1] > 0.99


def test_frc_with_registration(rng):
    big = smooth_image(rng, (200, 200), sigma=1.5)
    a = big[20:180, 20:180]
    b = fourier_shift(big, (2.3, -1.6))[20:180, 20:180]
    plain = fourier_ring_correlation(a, b, 0.5)
    reg = fourier_ring_correlation(a, b, 0.5, register=True)
    np.testing.assert_allclose(reg.shift, (2.3, -1.6), atol=0.05)
    assert reg.shape[0] < 160 and reg.shape[1] < 160  # cropped to the common area
    mid = (reg.q > 0) & (reg.q < 0.4)
    assert np.nanmin(reg.frc[mid]) > 0.95
    assert np.nanmin(plain.frc[(plain.q > 0.1) & (plain.q < 0.4)]) < 0.9  # the shift decorrelates the raw pair


def test_rectangular_images_use_the_coarser_ring_spacing(rng):
    img = smooth_image(rng, (64, 128))
    res = fourier_ring_correlation(img, img + 0.1 * rng.standard_normal((64, 128)), 1.0)
    assert res.q[1] == pytest.approx(1 / 64) and res.q[-1] == pytest.approx(0.5)
    assert np.all(res.n_per_ring[1:] > 0)


def test_bad_inputs_raise(rng):
    a = rng.standard_normal((32, 32))
    with pytest.raises(ValueError, match="2-D"):
        fourier_ring_correlation(a[None], a[None], 1.0)
    with pytest.raises(ValueError, match="same shape"):
        fourier_ring_correlation(a, a[:-1], 1.0)
    with pytest.raises(ValueError, match="pixel_size"):
        fourier_ring_correlation(a, a, 0.0)
    with pytest.raises(ValueError, match="pixel_size"):
        fourier_ring_correlation(a, a, -1.0)
    bad = a.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fourier_ring_correlation(a, bad, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        register_images(bad, a)
    with pytest.raises(ValueError, match="binning"):
        fourier_ring_correlation(a, a, 1.0, binning="cubic")
    with pytest.raises(ValueError, match="device"):
        fourier_ring_correlation(a, a, 1.0, device="tpu")


def test_apodisation_dip_at_the_first_ring_is_passed_over():
    q = np.arange(6) * 0.1
    curve = np.array([np.nan, 0.3, 0.9, 0.8, 0.3, 0.1])
    res = FRCResult(q=q, frc=curve, half_bit=np.full(6, 0.2), n_per_ring=np.full(6, 50), pixel_size=(1.0, 1.0),
                    shape=(11, 11), shift=None)
    # 0.5 is crossed between rings 3 (0.8) and 4 (0.3): q = 0.3 + 0.1 * 0.3 / 0.5 = 0.36 Å⁻¹
    assert res.resolution(0.5) == pytest.approx(1 / 0.36)
    never = FRCResult(q=q, frc=np.array([np.nan, 0.3, 0.2, 0.1, 0.0, 0.0]), half_bit=np.full(6, 0.2),
                      n_per_ring=np.full(6, 50), pixel_size=(1.0, 1.0), shape=(11, 11), shift=None)
    assert never.resolution(0.5) == pytest.approx(1 / 0.1)  # never above: the field of view
