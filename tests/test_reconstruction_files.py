"""DeepCDIReconstruction as a py4DSTEM citizen (reconstruction/storage.py, keywords.py, results.py): files that
py4DSTEM.read reopens as the object, py4DSTEM's keywords and result names, the NaN policy, measured positions."""

import warnings

import h5py
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import py4DSTEM
import pytest
from comparison_cases import comparison, dataset

import py4dstem_deepcdi  # noqa: F401  (registers the class with emdfile)
from py4dstem_deepcdi import load_pretrained, simulate_dataset
from py4dstem_deepcdi.cli import main
from py4dstem_deepcdi.comparison import read_comparison, score_reconstruction
from py4dstem_deepcdi.io import save_result
from py4dstem_deepcdi.models import DeepCDIModel
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.reconstruction import NAN_POLICY, DeepCDIReconstruction, StoredModel, read_reconstruction
from py4dstem_deepcdi.simulation import truth_from_node

matplotlib.use("Agg")
ARGS = dict(energy=300e3, semiangle_cutoff=17.1, C10=-100.0, C12=20.0, phi12=0.5, rotation_deg=0, transpose=False,
            verbose=False)


@pytest.fixture(scope="module")
def tiny_model(geometry):
    return DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "tiny"})


@pytest.fixture(scope="module")
def scan(geometry):
    return simulate_dataset(geometry, scan_shape=(10, 12), scan_step=0.3, electrons=1e5, seed=4)


def make(scan, model, **kwargs):
    return DeepCDIReconstruction(scan.datacube, **{**ARGS, "model": model, **kwargs})


@pytest.fixture(scope="module")
def finished(scan, tiny_model):
    return make(scan, tiny_model, name="hbn_phase").preprocess().reconstruct(precision="fp32")


def _same_arrays(a, b, patches=False):
    mine, theirs = a.stored_arrays(include_patches=patches), b.stored_arrays(include_patches=patches)
    assert set(mine) == set(theirs)
    for name, value in mine.items():
        np.testing.assert_allclose(theirs[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------ files
def test_save_then_py4dstem_read_gives_the_object_back(tmp_path, finished):
    path = finished.save(tmp_path / "phase.h5", include_patches=True)
    back = py4DSTEM.read(str(path))
    assert isinstance(back, DeepCDIReconstruction) and back.name == "hbn_phase" and back.datacube is None
    _same_arrays(finished, back, patches=True)
    assert back.sampling == pytest.approx(finished.sampling)
    assert back.options == finished.options and back.geometry.to_dict() == finished.geometry.to_dict()
    assert back.model.geometry.to_dict() == finished.model.geometry.to_dict()
    assert back.model.metadata["name"] == "tiny" and isinstance(back.model, StoredModel)
    assert back.timings == finished.timings and back.stitch_info == finished.stitch_info
    assert back.error == pytest.approx(finished.error)
    assert back.summary() == finished.summary()
    # calibrations in the file: the phase is a RealSlice in rad with axes in Å (detector frame), positions in Å
    with h5py.File(path) as f:
        node = f["hbn_phase_root/hbn_phase"]
        phase = node["_emd_object_phase"]
        assert phase.attrs["python_class"] == "RealSlice" and phase["data"].attrs["units"] == "rad"
        dim = phase["dim0"]
        assert dim.attrs["units"] == "A" and dim[1] - dim[0] == pytest.approx(finished.sampling[0])
        assert dim[0] == pytest.approx(-finished._origin_px[0] * finished.sampling[0])
        assert node["_emd_positions"]["data"].attrs["units"] == "A"
        assert node["_emd_error_map"]["data"].attrs["units"] == "rad"
    # a reopened reconstruction draws, describes itself and saves again
    assert back.visualize() is back and len(back.figure.axes) == 4
    plt.close(back.figure)
    assert "reconstructed" in repr(back)
    back.save(tmp_path / "again.h5")
    _same_arrays(finished, read_reconstruction(tmp_path / "again.h5"))


def test_py4dstem_save_reopens_and_the_object_stays_usable(tmp_path, finished):
    py4DSTEM.save(str(tmp_path / "p.h5"), finished, mode="w")  # the AssertionError of version 0.1
    back = py4DSTEM.read(str(tmp_path / "p.h5"))
    assert isinstance(back, DeepCDIReconstruction)
    _same_arrays(finished, back)
    finished.save(tmp_path / "after.h5")  # its tree is untouched: it can be saved (and compared) again
    assert read_reconstruction(tmp_path / "after.h5").name == "hbn_phase"


def test_reopened_reconstruction_needs_its_weights_to_reconstruct(tmp_path, scan, finished, tiny_model):
    path = finished.save(tmp_path / "phase.h5")
    back = read_reconstruction(path, datacube=scan.datacube)
    with pytest.raises(RuntimeError, match="without its weights"):
        back.reconstruct()
    again = read_reconstruction(path, datacube=scan.datacube, model=tiny_model).reconstruct(precision="fp32")
    np.testing.assert_allclose(again.object_phase, finished.object_phase, atol=1e-5)
    np.testing.assert_allclose(again.positions, finished.positions)


def test_shipped_model_is_reloaded(tmp_path):
    model = load_pretrained()
    ds = simulate_dataset(model.geometry, scan_shape=(6, 6), scan_step=0.4, dose=1e6, seed=1)
    recon = DeepCDIReconstruction(ds.datacube, 300e3, 17.1, model=model, rotation_deg=0, transpose=False,
                                  verbose=False, **model.geometry.aberrations).preprocess().reconstruct()
    back = read_reconstruction(recon.save(tmp_path / "phase.h5"), datacube=ds.datacube)
    assert not isinstance(back.model, StoredModel)
    np.testing.assert_allclose(back.reconstruct().object_phase, recon.object_phase, atol=1e-5)


def test_files_of_version_0_1_still_open(tmp_path, finished):
    """The old format: a RealSlice 'deepcdi_phase' (0 where uncovered) with the JSON record and child arrays."""
    summary = finished.summary()
    old = {k: summary[k] for k in ("kind", "sampling_A", "geometry", "model", "model_geometry", "preprocessing",
                                   "stitching", "timings", "origin_px")}
    arrays = {"positions_A": finished.positions, "offsets_rad": finished.offsets, "coverage": finished.coverage}
    path = save_result(tmp_path / "old.h5", np.nan_to_num(finished.object_phase), old, arrays)
    back = read_reconstruction(path)
    np.testing.assert_allclose(back.object_phase, finished.object_phase, atol=1e-6)  # NaN policy restored
    np.testing.assert_allclose(back.positions, finished.positions)
    assert back.error is None and back.error_map is None and back.name == "deepcdi_reconstruction"


def test_nan_policy_is_the_same_in_memory_and_on_disk(tmp_path, finished):
    uncovered = finished.coverage == 0
    assert uncovered.any() and "NaN" in NAN_POLICY
    for image in (finished.object_phase, finished.object, finished.error_map):
        assert np.isnan(image[uncovered]).all() and np.isfinite(image[~uncovered]).all()
    assert np.isfinite(finished.object_cropped).all() and np.isfinite(finished.object_phase_cropped).all()
    back = read_reconstruction(finished.save(tmp_path / "phase.h5"))
    assert np.array_equal(np.isnan(back.object_phase), uncovered)
    assert np.array_equal(np.isnan(back.error_map), uncovered)


def test_py4dstem_result_names(finished):
    assert finished.object.dtype == np.complex64
    np.testing.assert_allclose(np.angle(finished.object_cropped), finished.object_phase_cropped, atol=1e-5)
    np.testing.assert_allclose(np.abs(finished.object_cropped), 1.0, atol=1e-6)  # deep CDI retrieves the phase only
    probe = finished.probe
    assert np.iscomplexobj(probe) and probe.shape == (32, 32)
    assert float((np.abs(probe) ** 2).sum()) == pytest.approx(1.0, rel=1e-5)
    assert finished.sampling == finished.model.geometry.sampling and finished.angular_sampling == (2.0, 2.0)
    # error: the coverage-weighted RMS of the disagreement map, a few hundredths of a radian for this network
    covered = finished.coverage > 0
    rms = np.sqrt((finished.coverage[covered] * finished.error_map[covered] ** 2).sum() / finished.coverage.sum())
    assert finished.error == pytest.approx(rms) and 0 < finished.error < 1


def test_comparison_file_holds_both_objects(tmp_path):
    """The comparison file keeps py4DSTEM's ptychography object and the deep-CDI reconstruction; both reopen as
    their classes, and the reopened reconstruction (with its datacube) is compared again with the same result."""
    c = comparison()
    path = c.save(tmp_path / "comparison.h5")
    back = read_comparison(path)
    epie = back["epie"]
    assert isinstance(epie, py4DSTEM.process.phase.SingleslicePtychography)
    np.testing.assert_allclose(epie.object, c.epie.object)
    assert py4DSTEM.read(str(path), datapath="deepcdi_comparison/epie").object.shape == c.epie.object.shape
    np.testing.assert_allclose(back["frc_q_per_A"], c.frc["q"])  # the frequency axis stored with the curve
    with h5py.File(path) as f:
        assert f["deepcdi_comparison/deepcdi_phase/frc/dim0"].attrs["units"] == "A^-1"
    recon = back["reconstruction"].attach_datacube(dataset().datacube)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = recon.compare_with_epie(epie=c.epie, ground_truth=dataset(), progress=False, adf=False)
    assert again.box == c.box and again.correlation == pytest.approx(c.correlation, abs=1e-5)


def test_simulate_stores_the_truth_with_its_own_calibration(tmp_path):
    path = tmp_path / "data.h5"
    assert main(["simulate", "--output", str(path), "--scan", "6", "6", "--step", "0.3"]) == 0
    datacube = py4DSTEM.read(str(path))
    assert datacube.calibration.get_R_pixel_size() == pytest.approx(0.3)  # the scan step
    node = datacube.tree("ground_truth_phase")
    phase, sampling, positions = truth_from_node(node)
    assert sampling == pytest.approx(0.3076, abs=1e-4) and node.units == "rad"
    assert node.metadata["ground_truth"]["scan_step_A"] == [0.3, 0.3]
    np.testing.assert_allclose(np.diff(positions[:2], axis=0), [[0.0, 0.3]])


# ------------------------------------------------------------------ keywords
def test_unknown_keywords_list_the_accepted_ones(scan, tiny_model):
    with pytest.raises(TypeError, match=r"\['foo'\].*storage.*initial_scan_positions.*positions_mask.*C10"):
        make(scan, tiny_model, foo=1)
    with pytest.raises(TypeError, match="not iterative"):
        make(scan, tiny_model, num_iter=5)
    with pytest.raises(TypeError, match="not modelled"):
        make(scan, tiny_model, Cs=1e4)
    recon = make(scan, tiny_model).preprocess()
    with pytest.raises(TypeError, match=r"reconstruct.*\['num_iter'\].*not iterative.*max_batch_size"):
        recon.reconstruct(num_iter=3)
    with pytest.raises(TypeError, match="disagree"):
        recon.reconstruct(batch_size=16, max_batch_size=32)
    with pytest.raises(TypeError, match="visualize.*fig"):
        recon.reconstruct(precision="fp32").visualize(colour="red")


def test_py4dstem_keywords_are_accepted(scan, tiny_model):
    recon = DeepCDIReconstruction(
        scan.datacube, 300e3, 17.1, defocus=100.0, astigmatism=20.0, astigmatism_angle=0.5, model=tiny_model,
        rotation_deg=0, transpose=False, verbose=False, storage="cpu", name="mine", rolloff=1.5,
    )
    assert recon.geometry.aberrations["C10"] == -100.0 and recon.geometry.aberrations["C12"] == 20.0
    assert recon.name == "mine" and recon.storage == "cpu" and recon.geometry.rolloff == 1.5
    recon.preprocess().reconstruct(precision="fp32", max_batch_size=7, progress_bar=False)
    reference = make(scan, tiny_model).preprocess().reconstruct(precision="fp32", batch_size=7, progress=False)
    np.testing.assert_allclose(recon.object_phase, reference.object_phase, atol=1e-6)
    fig = plt.figure()
    assert recon.visualize(fig=fig, cbar=False).figure is fig and len(fig.axes) == 2
    plt.close(fig)
    for bad, match in ((dict(storage="gpu"), "storage='gpu'"), (dict(storage="disk"), "storage must be"),
                       (dict(rolloff=-1.0), "rolloff"), (dict(name="a/b"), "name must be")):
        with pytest.raises(ValueError, match=match):
            make(scan, tiny_model, **bad)


def test_measured_positions_and_mask(scan, tiny_model):
    raster = make(scan, tiny_model).preprocess()
    same = make(scan, tiny_model, initial_scan_positions=scan.scan_positions).preprocess()
    np.testing.assert_allclose(same.positions, raster.positions, atol=1e-9)  # the raster grid given explicitly
    rotated = DeepCDIReconstruction(scan.datacube, **{**ARGS, "rotation_deg": 30, "model": tiny_model},
                                    initial_scan_positions=scan.scan_positions.reshape(10, 12, 2)).preprocess()
    np.testing.assert_allclose(rotated.positions, make(scan, tiny_model, rotation_deg=30).preprocess().positions)
    mask = np.ones((10, 12), bool)
    mask[4:6, 5:8] = False
    masked = make(scan, tiny_model, positions_mask=mask).preprocess()
    assert len(masked.positions) == len(masked.data.amplitudes) == 114
    np.testing.assert_allclose(masked.positions, raster.positions[mask.ravel()])
    np.testing.assert_allclose(masked.data.amplitudes, raster.data.amplitudes[mask.ravel()])
    kept = make(scan, tiny_model, positions_mask=mask, initial_scan_positions=scan.scan_positions[mask.ravel()])
    np.testing.assert_allclose(kept.preprocess().positions, masked.positions, atol=1e-9)
    with pytest.raises(ValueError, match="initial_scan_positions must have shape"):
        make(scan, tiny_model, initial_scan_positions=scan.scan_positions[:10])
    with pytest.raises(ValueError, match="positions_mask must have the scan's shape"):
        make(scan, tiny_model, positions_mask=mask[:5])


def test_masked_measured_scan_compares_with_epie(geom):
    """ePIE gets the reconstruction's measured positions and mask, and both images see the same truth."""
    ds = simulate_dataset(geom, scan_shape=(12, 12), scan_step=0.5, electrons=1e6, seed=1, position_jitter=0.05)
    mask = np.ones((12, 12), bool)
    mask[0, :3] = False
    recon = DeepCDIReconstruction(ds.datacube, 300e3, 17.1, C10=-100.0, model=DeepCDIModel(
        ResUNet(width=0.125, depth=2).eval(), geom, {}), rotation_deg=0, transpose=False, verbose=False,
        initial_scan_positions=ds.scan_positions, positions_mask=mask).preprocess().reconstruct(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = recon.compare_with_epie(num_iter=4, ground_truth=ds, progress=False, adf=False)
    assert len(c.epie.positions_A) == 141 and c.epie.parameters["positions_mask"]
    np.testing.assert_allclose(c.epie.positions_A, recon.positions)
    assert c.vs_truth["epie"]["correlation"] > 0.8


def test_jittered_scan_reconstructs_as_well_as_a_raster_one():
    """With the shipped model: a scan whose positions are off the grid by 0.2 Å (RMS per axis) reconstructs as well
    as the raster scan when the measured positions are given, and worse when they are ignored."""
    model = load_pretrained()
    g = model.geometry
    kwargs = dict(model=model, rotation_deg=0.0, transpose=False, verbose=False, **g.aberrations)
    scores = {}
    for jitter in (0.0, 0.2):
        ds = simulate_dataset(g, scan_shape=(16, 16), scan_step=0.4, dose=1e6, seed=3, position_jitter=jitter)
        recon = DeepCDIReconstruction(ds.datacube, g.energy, g.semiangle_cutoff,
                                      initial_scan_positions=ds.scan_positions, **kwargs).preprocess().reconstruct()
        scores[jitter] = score_reconstruction(recon, ds)["correlation"]
    ignored = DeepCDIReconstruction(ds.datacube, g.energy, g.semiangle_cutoff, **kwargs).preprocess().reconstruct()
    offset = (ds.positions - ignored.positions).mean(0)  # the raster it assumes, placed on the truth
    scores["ignored"] = score_reconstruction(ignored, (ds.phase, ds.sampling, offset))["correlation"]
    assert scores[0.2] >= scores[0.0] - 0.03, scores
    assert scores["ignored"] < scores[0.2] - 0.03, scores
