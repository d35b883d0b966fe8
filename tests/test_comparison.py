"""Deep CDI vs py4DSTEM's ePIE: run_epie, compare_with_epie, the figure and the file.

The deep-CDI side uses a tiny untrained network (its quality is not asserted); ePIE's quality is, against the
simulator's ground truth. An "oracle" reconstruction (the truth written onto the deep-CDI canvas) checks the whole
alignment chain: positions → canvas → ePIE object → truth.
"""

import json
import warnings

import numpy as np
import pytest
import torch

from py4dstem_deepcdi import DeepCDIModel, DeepCDIReconstruction, ResUNet
from py4dstem_deepcdi.comparison import (
    Comparison,
    EPIEDivergenceError,
    _largest_rectangle,
    _sample,
    compare_with_epie,
    image_frc,
    phase_correlation,
    read_comparison,
    remove_background,
    run_epie,
)
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.simulation import simulate_dataset

torch.set_num_threads(1)

EPIE_ITERATIONS = 8


@pytest.fixture(scope="module")
def geom():
    return ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)


def _recon(ds, geom, rotation_deg=0.0):
    model = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geom, {})
    recon = DeepCDIReconstruction(
        ds.datacube, geom.energy, geom.semiangle_cutoff, polar_parameters=geom.aberrations, model=model,
        rotation_deg=rotation_deg, transpose=False, verbose=False,
    )
    return recon.preprocess().reconstruct(progress=False)


@pytest.fixture(scope="module")
def ds(geom):
    return simulate_dataset(geom, scan_shape=(12, 12), scan_step=0.5, electrons=1e6, seed=1)


@pytest.fixture(scope="module")
def recon(ds, geom):
    return _recon(ds, geom)


@pytest.fixture(scope="module")
def comparison(recon, ds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained network's image may not register: that warning is expected
        return compare_with_epie(recon, num_iter=EPIE_ITERATIONS, ground_truth=ds, progress=False)


def _oracle(recon, ds):
    """A copy of the reconstruction whose phase image is the ground truth itself, placed by the positions."""
    import copy

    oracle = copy.copy(recon)
    h, w = recon.object_phase.shape
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).astype(float)
    origin = (recon.positions_px - recon.positions / np.array(recon.sampling)).mean(0)
    delta = (ds.positions - recon.positions).mean(0)
    truth_px = ((grid - origin[:, None, None]) * recon.sampling[0] + delta[:, None, None]) / ds.sampling
    oracle.object_phase = np.where(np.isfinite(recon.object_phase), _sample(ds.phase, truth_px), np.nan)
    return oracle


# ------------------------------------------------------------------------------------------------ ePIE itself
def test_epie_recovers_the_truth(comparison):
    scores = comparison.vs_truth["epie"]
    assert scores["correlation"] >= 0.9
    assert 0.7 < scores["phase_scale"] < 1.3
    assert len(comparison.epie.error_history) == EPIE_ITERATIONS
    assert comparison.epie.error_history[-1] < comparison.epie.error_history[0]
    assert len(comparison.epie_truth_correlation) == EPIE_ITERATIONS
    assert comparison.epie_truth_correlation[-1] == pytest.approx(scores["correlation"], abs=1e-9)


def test_rotated_scan_matches_py4dstem_convention(geom):
    """Scan rotated by 30° in the simulator; both methods are told 30°: ePIE must find the truth."""
    ds = simulate_dataset(geom, scan_shape=(12, 12), scan_step=0.5, electrons=1e6, seed=2, rotation_deg=30)
    recon = _recon(ds, geom, rotation_deg=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compare_with_epie(recon, num_iter=EPIE_ITERATIONS, ground_truth=ds, progress=False, adf=False)
    assert c.epie.rotation_deg == pytest.approx(30)
    assert not c.epie.parameters["explicit_positions"]  # py4DSTEM rotated its own raster scan
    assert c.vs_truth["epie"]["correlation"] >= 0.9
    # the wrong sense of rotation must not work as well
    wrong = run_epie(recon, num_iter=EPIE_ITERATIONS, rotation_deg=-30, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c_wrong = compare_with_epie(recon, epie=wrong, ground_truth=ds, progress=False, adf=False)
    assert c_wrong.vs_truth["epie"]["correlation"] < c.vs_truth["epie"]["correlation"] - 0.2


def test_transposed_scan_positions_follow_py4dstem(ds, geom):
    # run_epie checks at run time that py4DSTEM's positions are this package's scan_positions (raises otherwise)
    result = run_epie(ds.datacube, geom, num_iter=1, rotation_deg=20, transpose=True, progress=False)
    assert result.transpose and result.rotation_deg == pytest.approx(20)


def test_oracle_reconstruction_aligns_with_epie_and_truth(recon, ds, comparison):
    c = compare_with_epie(_oracle(recon, ds), epie=comparison.epie, ground_truth=ds, progress=False, adf=False)
    assert c.vs_truth["deep_cdi"]["correlation"] > 0.999
    assert c.correlation >= 0.9
    assert np.hypot(*c.registration["shift_px"]) < 0.25  # the positions alone align the two images
    assert c.registration["applied"]


# ------------------------------------------------------------------------------------------------ comparison
def test_end_to_end_numbers(comparison, recon):
    c = comparison
    assert isinstance(c, Comparison)
    assert c.deep_phase.shape == c.epie_phase.shape == c.truth_phase.shape
    assert min(c.deep_phase.shape) >= 8
    for key in ("q", "half_bit"):
        assert np.all(np.isfinite(c.frc[key]))
    assert np.isnan(c.frc["frc"][0]) and np.all(np.isfinite(c.frc["frc"][1:]))  # DC ring: means removed
    assert np.all(np.abs(c.frc["frc"][1:]) <= 1 + 1e-9)
    assert np.all(np.diff(c.frc["q"]) > 0) and c.frc["q"][-1] <= 0.5 / c.sampling[0] + 1e-9
    for value in c.resolution_A.values():  # NaN means "never crossed up to Nyquist"
        assert np.isnan(value) or (2 * c.sampling[0] - 1e-9 <= value <= max(c.deep_phase.shape) * c.sampling[0] + 1e-9)
    assert np.isfinite(c.correlation)
    t = c.timings
    assert t["deep_cdi_s"] == pytest.approx(recon.timings["inference_s"] + recon.timings["stitching_s"])
    assert t["epie_s"] > 0 and t["positions"] == 144
    # offsets removed from every image
    for image in (c.deep_phase, c.epie_phase, c.truth_phase):
        assert abs(float(image.mean())) < 1e-5
    summary = c.summary()
    json.dumps(summary)
    assert summary["vs_truth"]["epie"]["correlation"] == c.vs_truth["epie"]["correlation"]
    assert "FRC resolution" in repr(c) and "ePIE vs truth" in repr(c)
    assert c.adf is not None and c.adf.shape == (12, 12) and np.all(np.isfinite(c.adf))


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


def test_largest_rectangle():
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3:11] = True
    mask[0:10, 5] = True
    assert _largest_rectangle(mask) == (2, 8, 3, 11)
    assert _largest_rectangle(np.zeros((4, 4), bool))[1] - _largest_rectangle(np.zeros((4, 4), bool))[0] == 0


# ------------------------------------------------------------------------------------------------ errors
def test_reconstruction_must_be_finished(ds, geom):
    model = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geom, {})
    recon = DeepCDIReconstruction(ds.datacube, geom.energy, geom.semiangle_cutoff, C10=-100.0, model=model,
                                  rotation_deg=0, transpose=False, verbose=False)
    with pytest.raises(RuntimeError, match="preprocess"):
        run_epie(recon, num_iter=1, progress=False)
    with pytest.raises(RuntimeError, match="finished"):
        compare_with_epie(recon, num_iter=1)
    recon.preprocess()
    with pytest.raises(RuntimeError, match="finished"):
        compare_with_epie(recon, num_iter=1)
    with pytest.raises(TypeError, match="DeepCDIReconstruction"):
        compare_with_epie(ds.datacube)


def test_fields_of_view_that_do_not_overlap(recon):
    elsewhere = run_epie(recon, num_iter=1, positions=recon.positions + 100.0, progress=False)  # 100 Å away
    with pytest.raises(ValueError, match="do not overlap"):
        compare_with_epie(recon, epie=elsewhere, progress=False)


def test_ground_truth_from_another_scan_is_refused(recon, ds, comparison):
    wrong = (ds.phase, ds.sampling, ds.positions[:, ::-1])  # transposed positions
    with pytest.raises(ValueError, match="ground-truth positions"):
        compare_with_epie(recon, epie=comparison.epie, ground_truth=wrong, progress=False)


def test_epie_divergence_is_never_silent(recon):
    with pytest.raises(EPIEDivergenceError, match="diverged"):
        run_epie(recon, num_iter=2, step_size=1e6, progress=False)
    with pytest.warns(UserWarning, match="diverged"):
        result = run_epie(recon, num_iter=2, step_size=1e6, progress=False, on_divergence="warn")
    assert result.diverged
    with pytest.raises(EPIEDivergenceError):
        compare_with_epie(recon, epie=result, progress=False)
    with pytest.raises(EPIEDivergenceError):  # a huge step without NaN: the error explodes
        run_epie(recon, num_iter=3, step_size=50.0, progress=False)


def test_gpu_without_cupy_gives_a_clear_message(recon):
    try:
        import cupyx  # noqa: F401

        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="CuPy"):
        run_epie(recon, num_iter=1, device="gpu", progress=False)


def test_users_datacube_is_not_modified(ds, geom):
    before = ds.datacube.data.copy()
    keys = set(ds.datacube.treekeys)
    run_epie(ds.datacube, geom, num_iter=1, rotation_deg=0, transpose=False, progress=False)
    np.testing.assert_array_equal(ds.datacube.data, before)
    run_epie(ds.datacube, geom, num_iter=1, rotation_deg=0, transpose=False, progress=False,
             preprocess_kwargs={"diffraction_intensities_shape": (16, 16), "reshaping_method": "bin"})
    assert ds.datacube.data.shape == before.shape
    np.testing.assert_array_equal(ds.datacube.data, before)
    assert set(ds.datacube.treekeys) == keys
    assert ds.datacube.calibration.get_Q_pixel_size() == 2.0


# ------------------------------------------------------------------------------------------------ figure and file
def test_figure_layout(comparison, recon, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = comparison.visualize(path=tmp_path / "comparison.png")
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == 2 * 4 + 1  # deep CDI, ePIE, truth, ADF / three magnified views, FRC; + colour bar
    assert (tmp_path / "comparison.png").stat().st_size > 0
    frc_axis = fig.axes[7]
    labels = " ".join(t.get_text() for t in frc_axis.texts)
    assert "Å" in labels
    plt.close(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        no_truth = compare_with_epie(recon, epie=comparison.epie, progress=False)
    fig = no_truth.visualize()
    assert len(fig.axes) == 2 * 3 + 1
    plt.close(fig)


def test_save_and_read_round_trip(comparison, tmp_path):
    path = comparison.save(tmp_path / "comparison.h5")
    back = read_comparison(path)
    np.testing.assert_allclose(back["deep_phase"], comparison.deep_phase)
    np.testing.assert_allclose(back["epie_phase_rad"], comparison.epie_phase)
    np.testing.assert_allclose(back["truth_phase_rad"], comparison.truth_phase)
    np.testing.assert_allclose(back["frc"], comparison.frc["frc"])
    np.testing.assert_allclose(back["frc_q_per_A"], comparison.frc["q"])
    assert back["sampling"] == pytest.approx(comparison.sampling)
    assert back["summary"]["frc_resolution_A"] == pytest.approx(comparison.resolution_A)
    assert back["summary"]["timings"]["epie_s"] == pytest.approx(comparison.timings["epie_s"])
    with pytest.raises(FileExistsError):
        comparison.save(path)
    comparison.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.h5"]


def test_subsampled_rotated_scan(geom):
    """subsample=2 in deep CDI: ePIE gets every second pattern with twice the step, and still finds the truth."""
    ds = simulate_dataset(geom, scan_shape=(20, 20), scan_step=0.4, electrons=1e6, seed=4, rotation_deg=10)
    model = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geom, {})
    recon = DeepCDIReconstruction(ds.datacube, geom.energy, geom.semiangle_cutoff, polar_parameters=geom.aberrations,
                                  model=model, rotation_deg=10, transpose=False, subsample=2, verbose=False)
    recon.preprocess().reconstruct(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compare_with_epie(recon, num_iter=EPIE_ITERATIONS, ground_truth=ds, progress=False, adf=False)
    assert len(c.epie.positions_A) == 100
    assert c.epie.parameters["scan_step_A"] == pytest.approx([0.8, 0.8])
    assert c.vs_truth["epie"]["correlation"] >= 0.9


def test_vacuum_probe_is_passed_to_epie(recon, ds, geom):
    vacuum = np.abs(geom.probe_fourier) ** 2 * 1e4  # the simulator's aperture, centred like a measured pattern
    result = run_epie(recon, num_iter=EPIE_ITERATIONS, vacuum_probe_intensity=vacuum, progress=False)
    assert result.parameters["vacuum_probe"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compare_with_epie(recon, epie=result, ground_truth=ds, progress=False, adf=False)
    assert c.vs_truth["epie"]["correlation"] >= 0.9
    with pytest.raises(ValueError, match="vacuum_probe_intensity has shape"):
        run_epie(recon, num_iter=1, vacuum_probe_intensity=np.ones((16, 16)), progress=False)
