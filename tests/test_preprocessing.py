import warnings

import numpy as np
import py4DSTEM
import pytest
import torch

from py4dstem_deepcdi.encoding import network_input
from py4dstem_deepcdi.preprocessing import (
    aperture_radius_mrad,
    fit_disk_centres,
    preprocess,
    resample_patterns,
    resample_vacuum,
)
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.rotation import ROTATION_PRECISE_DEG, fit_rotation
from py4dstem_deepcdi.simulation import simulate_dataset


@pytest.fixture(scope="module")
def dataset(geometry):
    return simulate_dataset(geometry, scan_shape=(12, 10), scan_step=0.3, electrons=1e5, seed=1, noise=False)


def test_identity_geometry_reproduces_patterns(dataset, geometry):
    pp = preprocess(dataset.datacube, geometry, rotation_deg=0, transpose=False, centre=False)
    expected = network_input(torch.from_numpy(dataset.datacube.data.reshape(-1, 32, 32)), 1e5).numpy()
    np.testing.assert_allclose(pp.amplitudes, expected, atol=1e-5)
    assert pp.electrons_per_pattern == pytest.approx(1e5, rel=1e-5)
    assert pp.amplitudes.shape == (120, 32, 32)
    np.testing.assert_allclose(pp.positions[1] - pp.positions[0], [0, 0.3], atol=1e-6)


def test_user_datacube_is_not_modified(dataset, geometry):
    before = dataset.datacube.data.copy()
    preprocess(dataset.datacube, geometry, rotation_deg=0, transpose=False, subsample=2)
    np.testing.assert_array_equal(dataset.datacube.data, before)


def test_finer_detector_is_binned_and_counts_conserved(dataset, geometry):
    # the same patterns upsampled ×2 (each pixel split in four) on a 64×64 detector of 1 mrad pixels
    fine = np.repeat(np.repeat(dataset.datacube.data, 2, axis=2), 2, axis=3) / 4
    dc = py4DSTEM.DataCube(data=fine)
    dc.calibration.set_R_pixel_size(0.3)
    dc.calibration.set_R_pixel_units("A")
    dc.calibration.set_Q_pixel_size(1.0)
    dc.calibration.set_Q_pixel_units("mrad")
    pp = preprocess(dc, geometry, rotation_deg=0, transpose=False, centre=False)
    # the 64-pixel detector's centre pixel is 32, i.e. the boundary between coarse pixels 15.5/16: it is shifted by
    # half a fine pixel relative to the original; counts are conserved all the same
    assert pp.electrons_per_pattern == pytest.approx(1e5, rel=1e-3)
    fitted = preprocess(dc, geometry, rotation_deg=0, transpose=False, centre=True)
    expected = network_input(torch.from_numpy(dataset.datacube.data.reshape(-1, 32, 32)), 1e5).numpy()
    # with the fitted disk centre the resampled patterns match the originals closely
    assert np.abs(fitted.amplitudes - expected).mean() < 0.05 * expected.mean()


def test_resample_shift_moves_pattern():
    g = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0})
    pattern = torch.zeros(1, 32, 32, dtype=torch.float64)
    pattern[0, 10, 12] = 1.0
    out = resample_patterns(pattern, torch.tensor([[17.0, 16.0]]), 2.0, g)
    assert out[0, 9, 12] == pytest.approx(1.0)  # centre moved by +1 row: the spot lands one row earlier
    half = resample_patterns(pattern, torch.tensor([[16.5, 16.0]]), 2.0, g)
    assert half[0, 9, 12] == pytest.approx(0.5) and half[0, 10, 12] == pytest.approx(0.5)


def test_disk_centre_fit_finds_descan(geometry):
    ds = simulate_dataset(geometry, scan_shape=(8, 8), scan_step=0.3, electrons=1e5, seed=2, noise=False)
    data = ds.datacube.data.copy()
    shifted = np.empty_like(data)
    for i in range(8):  # a descan of 1 px per scan row along Qx, as an instrument would add
        shifted[i] = np.roll(data[i], i, axis=1)
    centres, com, weights = fit_disk_centres(shifted)
    assert centres[7, 0, 0] - centres[0, 0, 0] == pytest.approx(7.0, abs=0.3)
    assert weights.min() > 0  # no outliers here
    # a few wild patterns (a bright spot far off the disk) do not tilt the plane: they are the outliers rejected
    wild = shifted.copy()
    wild[0, :3, 2, 2] += 3e5
    robust, _, weights = fit_disk_centres(wild, repair=False)
    np.testing.assert_allclose(robust, centres, atol=0.05)
    assert (weights[0, :3] == 0).all() and (weights == 0).sum() == 3


def test_subsample_and_rotation(dataset, geometry):
    pp = preprocess(dataset.datacube, geometry, rotation_deg=90, transpose=False, subsample=2)
    assert pp.scan_shape == (6, 5) and pp.scan_step == (0.6, 0.6)
    np.testing.assert_allclose(pp.positions[1] - pp.positions[0], [0.6, 0], atol=1e-5)
    with pytest.warns(UserWarning, match="imprecise"):  # 12×10 noise-free positions: ± 2.8°
        estimated = preprocess(dataset.datacube, geometry)
    assert abs(estimated.rotation_deg) < 3 and estimated.transpose is False
    assert estimated.report["rotation"]["source"] == "estimated"


def test_bad_inputs(dataset, geometry):
    with pytest.raises(ValueError, match="4-D datacube"):
        preprocess(dataset.datacube.data[0], geometry)
    with pytest.raises(ValueError, match="position"):
        preprocess(dataset.datacube.data[:1, :1], geometry, scan_step=0.3, angular_sampling=2.0)
    raw = py4DSTEM.DataCube(data=dataset.datacube.data.copy())
    with pytest.raises(ValueError, match="missing real-space calibration"):
        preprocess(raw, geometry)
    raw.calibration.set_R_pixel_size(0.3)
    raw.calibration.set_R_pixel_units("A")
    with pytest.raises(ValueError, match="missing diffraction calibration"):
        preprocess(raw, geometry)
    nan = dataset.datacube.data.copy()
    nan[2, 3, 5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        preprocess(nan, geometry, scan_step=0.3, angular_sampling=2.0, centre=False, rotation_deg=0, transpose=False)
    negative = dataset.datacube.data.copy()
    negative[2, 3, 16, 16] = -500
    with pytest.raises(ValueError, match="negative counts"):
        preprocess(
            negative, geometry, scan_step=0.3, angular_sampling=2.0, centre=False, rotation_deg=0, transpose=False
        )
    # told 1 mrad per pixel for 2: the bright-field disk contradicts the calibration, and the error says by how much
    with pytest.raises(ValueError, match=r"7.84 mrad .* imply 15.7 mrad .* off by ×2.* 2 mrad per pixel"):
        preprocess(dataset.datacube.data, geometry, scan_step=0.3, angular_sampling=1.0)
    with pytest.raises(ValueError, match="reaches only"):  # a detector too small for the model's angular range
        preprocess(dataset.datacube.data, geometry, scan_step=0.3, angular_sampling=1.0, check_calibration=False)
    with pytest.raises(ValueError, match="normalise"):
        preprocess(dataset.datacube, geometry, normalise="per-pattern")
    with pytest.raises(ValueError, match="subsample"):
        preprocess(dataset.datacube, geometry, subsample=0)


def test_vacuum_pattern_is_resampled_onto_the_model_detector(geometry):
    """A vacuum pattern recorded off-centre on a finer, larger detector comes back as the model's own aperture."""
    own = np.abs(geometry.probe_fourier) ** 2
    own /= own.sum()
    fine = np.zeros((90, 80))
    fine[7:71, 12:76] = np.repeat(np.repeat(own, 2, 0), 2, 1) / 4  # 1 mrad pixels, disk centred at (39.5, 44.5)
    resampled = resample_vacuum(fine * 5e4, 1.0, geometry)
    np.testing.assert_allclose(resampled, own, atol=1e-7 * own.max())
    assert resampled.sum() == pytest.approx(1.0)
    ProbeGeometry(300e3, 17.1, angular_sampling=2.0, vacuum_probe_intensity=resampled)  # accepted as an aperture
    with pytest.raises(ValueError, match="catches only"):
        resample_vacuum(fine, 10.0, geometry)  # told 10 mrad: the disk would reach 85 mrad, past the ±32 mrad detector
    with pytest.raises(ValueError, match="non-negative"):
        resample_vacuum(-fine, 1.0, geometry)
    with pytest.raises(ValueError, match="resample_vacuum"):
        ProbeGeometry(300e3, 17.1, angular_sampling=2.0, vacuum_probe_intensity=fine)


def test_rotation_is_estimated_with_its_error(geometry):
    """A 32×32 scan rotated by 20° is estimated to within 1° (no warning); with the detector's axes swapped the
    transpose is found and the positions are the true ones in the swapped frame."""
    ds = simulate_dataset(geometry, scan_shape=(32, 32), scan_step=0.3, electrons=1e6, seed=1, rotation_deg=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp = preprocess(ds.datacube, geometry)
    assert pp.rotation_deg == pytest.approx(20.0, abs=1.0) and pp.transpose is False
    assert 0 < pp.rotation_fit.uncertainty_deg <= ROTATION_PRECISE_DEG
    assert pp.report["rotation"]["source"] == "estimated"
    swapped = np.ascontiguousarray(np.swapaxes(ds.datacube.data, 2, 3))
    pp = preprocess(swapped, geometry, scan_step=0.3, angular_sampling=2.0)
    assert pp.transpose is True
    true = ds.positions - ds.positions.mean(0)
    np.testing.assert_allclose(pp.positions - pp.positions.mean(0), true[:, ::-1], atol=0.05)


@pytest.mark.parametrize("shape", [(1, 6), (2, 2), (6, 2)])
def test_rotation_of_a_tiny_scan_falls_back(geometry, shape):
    """Scans of fewer than 3×3 positions have no curl to minimise: 0°, no transpose, and a warning."""
    ds = simulate_dataset(geometry, scan_shape=shape, scan_step=0.3, electrons=1e5, seed=1)
    with pytest.warns(UserWarning, match=r"cannot be estimated .* too small .* using 0° and transpose=False"):
        pp = preprocess(ds.datacube, geometry)
    assert (pp.rotation_deg, pp.transpose) == (0.0, False) and pp.report["rotation"]["source"] == "fallback"


def test_fit_rotation_of_a_gradient_field(rng):
    """The curl-free rotation of an exact gradient field, turned by 25° (and transposed), in closed form."""
    x, y = np.meshgrid(np.arange(24) * 0.3, np.arange(20) * 0.3, indexing="ij")
    gradient = np.stack([np.cos(1.3 * x) * np.cos(0.7 * y) * 1.3, -np.sin(1.3 * x) * np.sin(0.7 * y) * 0.7], -1)
    gradient += 0.2 * np.stack([np.cos(2.1 * x + 0.4 * y), 0.4 / 2.1 * np.cos(2.1 * x + 0.4 * y)], -1)
    turn = np.deg2rad(-25.0)  # the detector sees the scan's field turned by -25°: the scan is rotated by +25°
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    detector = gradient @ rotation.T
    fit = fit_rotation(detector, (0.3, 0.3), band_limit=10.0)
    assert fit.angle_deg == pytest.approx(25.0, abs=0.5) and fit.transpose is False and fit.usable
    fit = fit_rotation(detector[..., ::-1], (0.3, 0.3), band_limit=10.0)
    assert fit.transpose is True and fit.usable
    noise = fit_rotation(rng.standard_normal((24, 20, 2)), (0.3, 0.3), band_limit=10.0)
    assert not noise.usable and "standard error" in noise.reason


@pytest.mark.parametrize(
    "size, units, match",
    [
        (2.0, "A^-1", r"the ratio 19.7 is λ·1000 = 19.7 .* labelled Å⁻¹"),  # mrad labelled Å⁻¹
        (2e-3 / 0.019687486388201916, "mrad", r"λ·1000 = 19.7 \(or its inverse\)"),  # Å⁻¹ labelled mrad
        (2.2, "mrad", r"18\.[89] mrad .* imply 17\.[12] mrad .* off by ×0.9.* the data imply 2 mrad per pixel"),  # +10%
        (1.8, "mrad", r"15\.[45] mrad .* imply 17\.[12] mrad .* off by ×1.1"),  # camera length 10% off the other way
    ],
)
def test_wrong_diffraction_calibrations_are_refused(geometry, size, units, match):
    """A sharp aperture's disk measured with a wrong detector calibration: refused, naming both radii and the cause;
    check_calibration=False reconstructs anyway."""
    sharp = geometry.replace(rolloff=0.0)
    ds = simulate_dataset(sharp, scan_shape=(6, 6), scan_step=0.3, electrons=1e5, seed=1)
    datacube = py4DSTEM.DataCube(data=ds.datacube.data)
    datacube.calibration.set_R_pixel_size(0.3)
    datacube.calibration.set_R_pixel_units("A")
    datacube.calibration.set_Q_pixel_size(size)
    datacube.calibration.set_Q_pixel_units(units)
    with pytest.raises(ValueError, match=match):
        preprocess(datacube, sharp, rotation_deg=0, transpose=False)
    if size == 2.2:  # (at 1.8 mrad the detector is too small for the model: refused further on)
        pp = preprocess(datacube, sharp, rotation_deg=0, transpose=False, check_calibration=False)
        assert pp.bright_field_radius_mrad == pytest.approx(size / 2 * aperture_radius_mrad(sharp), rel=1e-6)
    # the disk of a py4DSTEM rolloff-tapered aperture (9% smaller) is explained by the nominal semi-angle: accepted
    preprocess(ds.datacube, geometry, rotation_deg=0, transpose=False)
