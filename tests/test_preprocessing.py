import numpy as np
import py4DSTEM
import pytest
import torch

from py4dstem_deepcdi.encoding import network_input
from py4dstem_deepcdi.preprocessing import fit_disk_centres, preprocess, resample_patterns, resample_vacuum
from py4dstem_deepcdi.probe import ProbeGeometry
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
    centres = fit_disk_centres(shifted)
    assert centres[7, 0, 0] - centres[0, 0, 0] == pytest.approx(7.0, abs=0.3)


def test_subsample_and_rotation(dataset, geometry):
    pp = preprocess(dataset.datacube, geometry, rotation_deg=90, transpose=False, subsample=2)
    assert pp.scan_shape == (6, 5) and pp.scan_step == (0.6, 0.6)
    np.testing.assert_allclose(pp.positions[1] - pp.positions[0], [0.6, 0], atol=1e-5)
    estimated = preprocess(dataset.datacube, geometry)
    assert abs(estimated.rotation_deg) < 3 and estimated.transpose is False


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
    with pytest.raises(ValueError, match="reaches only"):  # a detector too small for the model's angular range
        preprocess(dataset.datacube.data, geometry, scan_step=0.3, angular_sampling=1.0)
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
