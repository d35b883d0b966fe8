import warnings

import numpy as np
import py4DSTEM
import pytest

import py4dstem_deepcdi  # noqa: F401  (registers DataCube.reconstruct_deepcdi)
from py4dstem_deepcdi.cli import build_parser, main
from py4dstem_deepcdi.models import DeepCDIModel
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.ramp import com_phase_gradients, probe_weighted_gradients
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction, read_reconstruction
from py4dstem_deepcdi.simulation import simulate_dataset


@pytest.fixture(scope="module")
def tiny_model(geometry):
    """An untrained network: these tests check the plumbing, not the image quality."""
    return DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "tiny"})


@pytest.fixture(scope="module")
def dataset(geometry):
    return simulate_dataset(geometry, scan_shape=(10, 12), scan_step=0.3, electrons=1e5, seed=4)


def make(dataset, model, **kwargs):
    args = dict(energy=300e3, semiangle_cutoff=17.1, C10=-100.0, C12=20.0, phi12=0.5, model=model,
                rotation_deg=0, transpose=False, verbose=False)
    args.update(kwargs)
    return DeepCDIReconstruction(dataset.datacube, **args)


def test_chaining_results_and_positions(dataset, tiny_model):
    recon = make(dataset, tiny_model).preprocess().reconstruct(precision="fp32")
    assert recon.patches.shape == (120, 32, 32)
    assert recon.offsets.shape == (120,)
    assert recon.object_phase.ndim == 2 and np.isfinite(recon.object_phase[recon.coverage > 0]).all()
    assert recon.sampling == tiny_model.geometry.sampling
    # positions on the canvas keep the scan's geometry: step 0.3 Å in pixels of the phase image
    d = np.diff(recon.positions_px[:2], axis=0)[0]
    np.testing.assert_allclose(d, [0, 0.3 / recon.sampling[1]], atol=1e-6)
    crop = recon.object_phase_cropped
    expected = np.array([9 * 0.3 / recon.sampling[0], 11 * 0.3 / recon.sampling[1]])  # scanned extent in pixels
    assert np.all(np.abs(np.array(crop.shape) - expected) <= 1.01)
    assert {"preprocess_s", "inference_s", "stitching_s"} <= set(recon.timings)


def test_datacube_accessor(dataset, tiny_model):
    assert hasattr(py4DSTEM.DataCube, "reconstruct_deepcdi")
    recon = dataset.datacube.reconstruct_deepcdi(
        energy=300e3, semiangle_cutoff=17.1, C10=-100.0, C12=20.0, phi12=0.5, model=tiny_model, rotation_deg=0,
        transpose=False, verbose=False, reconstruct_kwargs={"precision": "fp32"},
    )
    assert isinstance(recon, DeepCDIReconstruction) and recon.object_phase is not None


def test_save_and_read_back(tmp_path, dataset, tiny_model):
    recon = make(dataset, tiny_model).preprocess().reconstruct(precision="fp32")
    path = recon.save(tmp_path / "phase.h5")
    back = read_reconstruction(path)
    assert isinstance(back, DeepCDIReconstruction) and back.datacube is None
    np.testing.assert_allclose(back.object_phase, recon.object_phase, atol=1e-6)  # NaN where uncovered, both
    np.testing.assert_allclose(back.positions, recon.positions)
    assert back.sampling == pytest.approx(recon.sampling)
    summary = back.summary()
    assert summary["geometry"]["energy_eV"] == 300e3 and summary["model"]["name"] == "tiny"
    # py4DSTEM reads it too, as the same class
    root = py4DSTEM.read(str(path))
    assert isinstance(root, DeepCDIReconstruction) and root.object_phase.shape == recon.object_phase.shape
    with pytest.raises(FileExistsError):
        recon.save(path)
    recon.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase.h5"]


def test_foreign_files_are_refused(tmp_path, dataset):
    py4DSTEM.save(str(tmp_path / "dc.h5"), dataset.datacube, mode="w")
    with pytest.raises(ValueError, match="not a py4dstem-deepcdi result"):
        read_reconstruction(tmp_path / "dc.h5")
    (tmp_path / "junk.h5").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable"):
        read_reconstruction(tmp_path / "junk.h5")


def test_visualize_returns_self_and_figure(tmp_path, dataset, tiny_model):
    recon = make(dataset, tiny_model).preprocess().reconstruct(precision="fp32")
    assert recon.visualize(ground_truth=dataset.phase, path=tmp_path / "f.png") is recon
    assert len(recon.figure.axes) >= 3 and (tmp_path / "f.png").stat().st_size > 1000


def test_bad_inputs(dataset, tiny_model):
    with pytest.raises(ValueError, match="C10: model -100 vs data 0"):
        DeepCDIReconstruction(dataset.datacube, 300e3, 17.1, C12=20.0, phi12=0.5, model=tiny_model)
    with pytest.raises(ValueError, match="energy"):
        make(dataset, tiny_model, energy=200e3)
    with pytest.raises(RuntimeError, match="gpu"):
        make(dataset, tiny_model, device="gpu")
    recon = make(dataset, tiny_model)
    with pytest.raises(RuntimeError, match="preprocess"):
        recon.positions  # noqa: B018
    with pytest.raises(RuntimeError, match="reconstruct"):
        recon.save("never.h5")
    with pytest.raises(ValueError, match="4-D"):
        DeepCDIReconstruction(dataset.datacube.data[0], 300e3, 17.1, C10=-100.0, C12=20.0, phi12=0.5,
                              model=tiny_model).preprocess()
    with pytest.raises(TypeError, match="unknown preprocess options"):
        recon.preprocess(binning=2)


def test_aperture_mismatch_is_refused_or_warned(dataset, tiny_model, geometry):
    """A bright-field disk 13% smaller than the model's aperture is refused (both radii named), or with
    check_calibration=False reconstructed with a warning; a 3% smaller one inside the trained edges is quiet."""
    other = simulate_dataset(geometry.replace(semiangle_cutoff=15.0), scan_shape=(6, 6), scan_step=0.3, electrons=1e5)
    with pytest.raises(ValueError, match=r"13.6 mrad .* imply 15.7 mrad .*check_calibration=False"):
        make(other, tiny_model).preprocess()
    with pytest.warns(UserWarning, match="bright-field disk"):
        make(other, tiny_model, check_calibration=False).preprocess()
    # a model trained over aperture edges 0-6 mrad wide accepts data with a 6 mrad edge (its half-maximum radius is 9%
    # smaller), which a sharp-aperture model refuses
    edged = simulate_dataset(geometry.replace(vacuum_probe_intensity=geometry.replace(rolloff=0.0).aperture_edge(6.0)),
                             scan_shape=(6, 6), scan_step=0.3, electrons=1e5)
    sharp = DeepCDIModel(tiny_model.network, geometry.replace(rolloff=0.0), {"name": "sharp"})
    trained = DeepCDIModel(tiny_model.network, geometry.replace(rolloff=0.0),
                           {"name": "edges", "training_set": {"edge_width_range": [0.0, 6.0]}})
    with pytest.raises(ValueError, match="bright-field disk"):
        make(edged, sharp).preprocess()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recon = make(edged, trained).preprocess()
    lo, hi = recon.trained_bright_field_mrad
    assert lo <= recon.data.bright_field_radius_mrad < hi


def test_stitch_fraction_and_centring_options(dataset, tiny_model):
    full = make(dataset, tiny_model).preprocess().reconstruct(precision="fp32")
    core = make(dataset, tiny_model).preprocess().reconstruct(precision="fp32", stitch_fraction=0.5)
    geometry = full.probe_geometry
    core_mask = geometry.mask & geometry.support_mask(0.5)
    assert 0 < core_mask.sum() < geometry.mask.sum()
    # every canvas pixel is covered by as many patches as the (smaller) stitching mask says
    assert core.coverage.sum() == pytest.approx(core_mask.sum() * len(core.patches))
    assert full.coverage.sum() == pytest.approx(geometry.mask.sum() * len(full.patches))
    assert core.stitch_info["stitch_fraction"] == 0.5
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="stitch_fraction must lie in"):
            make(dataset, tiny_model).preprocess().reconstruct(stitch_fraction=bad)
    # a datacube whose disk is at the detector centre: with or without centring the same input
    centred = make(dataset, tiny_model).preprocess(centre=False)
    np.testing.assert_allclose(centred.data.centre, 16.0)
    fitted = make(dataset, tiny_model).preprocess()
    np.testing.assert_allclose(fitted.data.centre, 16.0, atol=0.05)
    difference = np.abs(centred.data.amplitudes - fitted.data.amplitudes).mean()
    assert difference < 0.02 * np.abs(fitted.data.amplitudes).mean()  # sub-pixel resampling only


def test_ramp_is_anchored_to_the_centres_of_mass(dataset, tiny_model):
    """The anchored image differs from the stitched one by a plane, and its scan-averaged |P|²-weighted gradient
    equals the one the patterns' centres of mass measure."""

    kept = make(dataset, tiny_model).preprocess().reconstruct(precision="fp32", anchor_ramp=False)
    recon = make(dataset, tiny_model).preprocess().reconstruct(precision="fp32", anchor_ramp=True)
    assert kept.stitch_info["ramp_removed_rad_per_A"] is None and recon.stitch_info["anchor_ramp"]
    assert make(dataset, tiny_model).preprocess().reconstruct(precision="fp32").stitch_info["anchor_ramp"]  # default
    geometry = recon.probe_geometry
    measured = com_phase_gradients(recon.data.amplitudes, np.abs(geometry.probe_fourier) ** 2, amplitudes=True)
    centres = recon.positions_px
    image, valid = probe_weighted_gradients(recon.object_phase, centres, np.abs(geometry.probe) ** 2)
    np.testing.assert_allclose(image[valid].mean(0), measured[valid].mean(0), atol=1e-9)
    difference = recon.object_phase - kept.object_phase
    rows, cols = np.indices(difference.shape)
    finite = np.isfinite(difference)
    design = np.stack([np.ones(finite.sum()), rows[finite], cols[finite]], -1)
    coefficients, *_ = np.linalg.lstsq(design, difference[finite], rcond=None)
    np.testing.assert_allclose(design @ coefficients, difference[finite], atol=1e-5)
    removed = -coefficients[1:] / np.array(recon.sampling)
    np.testing.assert_allclose(removed, recon.stitch_info["ramp_removed_rad_per_A"], rtol=1e-4, atol=1e-7)


def test_scan_too_small_to_anchor_warns_and_keeps_the_stitched_image(geometry, tiny_model):
    """A 3×3 scan at 0.3 Å leaves no probe inside the stitched image: the default anchoring is skipped with a
    warning, not an error after the network pass."""
    small = simulate_dataset(geometry, scan_shape=(3, 3), scan_step=0.3, electrons=1e5, seed=1)
    with pytest.warns(RuntimeWarning, match="phase ramp not anchored"):
        recon = make(small, tiny_model).preprocess().reconstruct(precision="fp32")
    plain = make(small, tiny_model).preprocess().reconstruct(precision="fp32", anchor_ramp=False)
    assert not recon.stitch_info["anchor_ramp"] and recon.stitch_info["ramp_removed_rad_per_A"] is None
    np.testing.assert_array_equal(recon.object_phase, plain.object_phase)


@pytest.fixture(scope="module")
def lattice_scan():
    """24×24 positions at 0.3 Å, 10⁵ e⁻ per pattern, at the shipped model's geometry."""
    model = py4dstem_deepcdi.load_pretrained("hbn-300kv-17mrad")
    return model, simulate_dataset(model.geometry, scan_shape=(24, 24), scan_step=0.3, electrons=1e5, seed=3)


@pytest.mark.parametrize("factor, warned", [(1.0, None), (2.0, 0.5), (0.5, 2.0)])
def test_wrong_scan_step_is_found_by_the_patches(lattice_scan, factor, warned):
    """A scan step calibrated 2× too large (or small) makes the shipped model's patches disagree: the check names
    the factor that fits; the right calibration stays quiet."""
    model, ds = lattice_scan
    recon = DeepCDIReconstruction(ds.datacube, 300e3, 17.1, model=model, C10=-100.0, scan_step=0.3 * factor,
                                  rotation_deg=0, transpose=False, verbose=False).preprocess()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recon.reconstruct()
    messages = [str(w.message) for w in caught if "agree best with a scan step" in str(w.message)]
    errors = recon.stitch_info["scan_step_check"]
    assert set(errors) == {"1", "0.5", "0.71", "1.41", "2"}
    if warned is None:
        assert not messages and min(errors, key=errors.get) == "1"
    else:
        assert len(messages) == 1 and f"{warned:g}× the calibrated" in messages[0]
        assert errors[f"{warned:g}"] < 0.85 * errors["1"]
    assert recon.check_scan_step(warn=False) == pytest.approx({float(k): v for k, v in errors.items()})


def test_vacuum_probe_on_the_data_detector_is_checked_against_the_model(dataset, geometry):
    """A vacuum pattern on the data's own (finer) detector is resampled and compared with the model's aperture."""


    def finer(pattern):  # 2 mrad pixels split into four 1 mrad pixels
        return np.repeat(np.repeat(pattern, 2, -2), 2, -1) / 4

    own = np.abs(geometry.probe_fourier) ** 2
    vacuum_model = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations=geometry.aberrations,
                                 mask_threshold=0.1, vacuum_probe_intensity=own)
    model = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), vacuum_model, {"name": "tiny-vacuum"})
    datacube = py4DSTEM.DataCube(data=finer(dataset.datacube.data))
    datacube.calibration.set_R_pixel_size(0.3)
    datacube.calibration.set_R_pixel_units("A")
    datacube.calibration.set_Q_pixel_size(1.0)
    datacube.calibration.set_Q_pixel_units("mrad")
    args = dict(energy=300e3, semiangle_cutoff=17.1, C10=-100.0, C12=20.0, phi12=0.5, model=model, rotation_deg=0,
                transpose=False, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeepCDIReconstruction(datacube, vacuum_probe_intensity=finer(own), **args).preprocess()  # same aperture: quiet
    wider = finer(np.abs(ProbeGeometry(300e3, 19.0, angular_sampling=2.0).probe_fourier) ** 2)
    with pytest.warns(UserWarning, match="differs from the model's by"):
        DeepCDIReconstruction(datacube, vacuum_probe_intensity=wider, **args).preprocess()


def test_pooled_model_reconstructs_from_the_summed_neighbourhoods(dataset, geometry):
    """With a pooled model, preprocess sums each position's 3×3 neighbourhood (normalised by the patterns summed:
    the pooled input of a uniform scan is the mean pattern) and reconstruct feeds it to the network; a scan step
    outside the model's trained steps warns."""
    network = ResUNet(width=0.125, depth=2, in_channels=3).eval()
    trained = {"pool": 3, "pool_step_range": [0.2, 0.5]}
    model = DeepCDIModel(network, geometry, {"name": "pooled", "training_set": trained})
    recon = make(dataset, model, normalise="dataset").preprocess()
    d = recon.data
    assert d.pooled.shape == d.amplitudes.shape
    np.testing.assert_allclose(d.neighbour_offsets[1], [-0.3, -0.3])
    counts = (d.amplitudes.reshape(10, 12, 32, 32) ** 2).astype(np.float64)  # ∝ counts, same factor everywhere
    expected = counts[0:3, 3:6].mean((0, 1))
    np.testing.assert_allclose(d.pooled.reshape(10, 12, 32, 32)[1, 4] ** 2, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d.pooled.reshape(10, 12, 32, 32)[0, 0] ** 2, counts[:2, :2].mean((0, 1)), rtol=1e-4,
                               atol=1e-4)
    # normalised per pattern (the default), a neighbourhood is divided by the electrons of the patterns it sums
    recon = make(dataset, model).preprocess()
    d = recon.data
    electrons = d.pattern_electrons.reshape(10, 12, 1, 1)
    counts = (d.amplitudes.reshape(10, 12, 32, 32) ** 2).astype(np.float64) * electrons  # ∝ counts
    expected = counts[0:3, 3:6].sum((0, 1)) / electrons[0:3, 3:6].sum()
    np.testing.assert_allclose(d.pooled.reshape(10, 12, 32, 32)[1, 4] ** 2, expected, rtol=1e-4, atol=1e-4)
    recon.reconstruct(precision="fp32")
    assert np.isfinite(recon.object_phase[recon.coverage > 0]).all()
    with pytest.warns(UserWarning, match="outside the steps"):
        make(dataset, model, scan_step=0.6).preprocess()


@pytest.mark.filterwarnings("ignore:the scan rotation cannot be estimated")  # after the first
def test_plot_rotation_and_the_options(tmp_path, dataset, tiny_model):
    recon = make(dataset, tiny_model, rotation_deg=None, transpose=None)
    with pytest.warns(UserWarning, match="cannot be estimated"):  # 10×12 noisy positions: ± 5.7°, ambiguous transpose
        recon.preprocess()
    assert (recon.data.rotation_deg, recon.data.transpose) == (0.0, False)
    figure = recon.plot_rotation(path=tmp_path / "rotation.png")
    assert len(figure.axes[0].get_lines()) == 3 and (tmp_path / "rotation.png").stat().st_size > 1000
    fit = recon.data.rotation_fit
    curl = fit.curl_fraction(np.array([fit.angle_deg, fit.angle_deg + 45.0]), fit.transpose)
    assert curl[0] < curl[1]  # the estimate is the minimum
    assert {"repair", "normalise", "check_calibration"} <= set(recon.options)
    assert recon.preprocess(normalise="dataset").options["normalise"] == "dataset"
    with pytest.raises(ValueError, match="normalise must be one of"):
        recon.preprocess(normalise="each")
    metadata = make(dataset, tiny_model).preprocess().reconstruct(precision="fp32").summary()["preprocessing"]
    assert metadata["normalise"] == "pattern" and metadata["report"]["rotation"]["source"] == "given"


def test_simulate_then_reconstruct_with_the_shipped_model_is_quiet(tmp_path):
    """`deepcdi simulate` makes the shipped model's sharp aperture: its data raise no bright-field (or any other)
    warning in `deepcdi reconstruct`."""
    assert build_parser().parse_args(["simulate", "--output", "x.h5"]).rolloff == 0.0
    data = tmp_path / "data.h5"
    assert main(["simulate", "--output", str(data), "--scan", "8", "8"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["reconstruct", str(data), "--output", str(tmp_path / "phase.h5"), "--energy", "300e3",
                     "--semiangle", "17.1", "--C10", "-100", "--rotation", "0", "--no-transpose", "--quiet",
                     "--precision", "fp32"]) == 0
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
