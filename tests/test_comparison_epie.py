"""py4DSTEM's ePIE as the baseline (comparison/epie.py): options, conventions, divergence, the caller's data."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from comparison_cases import EPIE_ITERATIONS, comparison, reconstruction

from py4dstem_deepcdi.comparison import compare_with_epie
from py4dstem_deepcdi.comparison.epie import EPIEDivergenceError, EPIEOptions, EPIEResult, run_epie
from py4dstem_deepcdi.simulation import simulate_dataset

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ options
def test_options_defaults_and_help():
    o = EPIEOptions()
    assert (o.num_iter, o.step_size, o.fix_probe, o.seed, o.device) == (50, 0.5, True, 0, "cpu")
    assert (o.progress, o.store_iterations, o.on_divergence) == (True, False, "raise")
    assert o.preprocess_kwargs == {} and o.reconstruct_kwargs == {}
    for f in dataclasses.fields(EPIEOptions):
        assert f.metadata["help"], f.name  # the CLI builds its flags from these
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.num_iter = 3


def test_options_are_validated_and_normalised():
    o = EPIEOptions(num_iter=3.0, step_size=1, preprocess_kwargs=None)
    assert o.num_iter == 3 and isinstance(o.num_iter, int) and isinstance(o.step_size, float)
    assert o.preprocess_kwargs == {}
    for bad in ({"num_iter": 0}, {"step_size": 0.0}, {"step_size": float("nan")}, {"on_divergence": "ignore"}):
        with pytest.raises(ValueError):
            EPIEOptions(**bad)


def test_options_build_from_keywords():
    base = EPIEOptions(num_iter=7, seed=3)
    built = EPIEOptions.build(base, fix_probe=False, step_size=0.25)
    assert (built.num_iter, built.seed, built.fix_probe, built.step_size) == (7, 3, False, 0.25)
    assert base.fix_probe  # the original is untouched
    assert EPIEOptions.build(None) == EPIEOptions()
    kwargs = {"fix_probe_com": False}
    assert EPIEOptions.build(reconstruct_kwargs=kwargs).reconstruct_kwargs is not kwargs  # a copy
    with pytest.raises(TypeError, match="unknown ePIE settings"):
        EPIEOptions.build(num_iters=3)


def test_run_epie_rejects_unknown_keywords(recon):
    with pytest.raises(TypeError, match="num_iters"):
        run_epie(recon, num_iters=1, progress=False)


# ------------------------------------------------------------------------------------------------ ePIE itself
def test_epie_recovers_the_truth():
    c = comparison()
    scores = c.vs_truth["epie"]
    assert scores["correlation"] >= 0.9
    assert 0.7 < scores["phase_scale"] < 1.3
    assert len(c.epie.error_history) == EPIE_ITERATIONS
    assert c.epie.error_history[-1] < c.epie.error_history[0]
    assert len(c.epie_truth_correlation) == EPIE_ITERATIONS
    assert c.epie_truth_correlation[-1] == pytest.approx(scores["correlation"], abs=1e-9)


def test_result_numbers_and_frame(recon):
    result = run_epie(recon, options=EPIEOptions(num_iter=2, progress=False, seed=5))
    assert isinstance(result, EPIEResult)
    assert result.num_iter == 2 and result.parameters["seed"] == 5 and not result.parameters["explicit_positions"]
    assert result.final_error == result.error_history[-1]
    # the positions the run used map into the object; the cropped phase holds the pixels inside their bounding box
    px = result.to_pixels(result.positions_A)
    assert np.all(px >= 0) and np.all(px <= np.asarray(result.object.shape) - 1)
    lo, hi = np.ceil(px.min(0)).astype(int), np.floor(px.max(0)).astype(int) + 1
    assert result.crop_origin_px == tuple(lo) and result.phase.shape == tuple(hi - lo)
    np.testing.assert_allclose(result.phase, np.angle(result.object[lo[0] : hi[0], lo[1] : hi[1]]), atol=1e-6)
    np.testing.assert_allclose(result.positions_A - result.positions_A.mean(0),
                               recon.positions - recon.positions.mean(0), atol=1e-9)
    assert result.ms_per_position_iteration == pytest.approx(1e3 * result.time_s / (144 * 2))
    summary = result.summary()
    assert summary["positions"] == 144 and summary["final_error"] == pytest.approx(result.final_error)
    assert "2 iterations on 144 positions" in repr(result)


def test_rotated_scan_matches_py4dstem_convention(geom):
    """Scan rotated by 30° in the simulator; both methods are told 30°: ePIE must find the truth."""
    ds = simulate_dataset(geom, scan_shape=(12, 12), scan_step=0.5, electrons=1e6, seed=2, rotation_deg=30)
    recon = reconstruction(ds, geom, rotation_deg=30)
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


# ------------------------------------------------------------------------------------------------ errors
def test_reconstruction_must_be_preprocessed(ds, geom):
    recon = reconstruction(ds, geom, reconstruct=False)
    with pytest.raises(RuntimeError, match="preprocess"):
        run_epie(recon, num_iter=1, progress=False)


def test_datacube_needs_geometry_and_positions_need_the_scan_shape(ds, geom, recon):
    with pytest.raises(ValueError, match="geometry"):
        run_epie(ds.datacube, num_iter=1, progress=False)
    with pytest.raises(ValueError, match=r"positions must have shape \(144, 2\)"):
        run_epie(recon, num_iter=1, positions=np.zeros((10, 2)), progress=False)


def test_epie_divergence_is_never_silent(recon):
    with pytest.raises(EPIEDivergenceError, match="diverged"):
        run_epie(recon, num_iter=2, step_size=1e6, progress=False)
    with pytest.warns(UserWarning, match="diverged"):
        result = run_epie(recon, num_iter=2, step_size=1e6, progress=False, on_divergence="warn")
    assert result.diverged and "DIVERGED" in repr(result)
    with pytest.raises(EPIEDivergenceError):
        compare_with_epie(recon, epie=result, progress=False)
    with pytest.raises(EPIEDivergenceError):  # a huge step without NaN: the error explodes
        run_epie(recon, num_iter=3, step_size=50.0, progress=False)


def test_gpu_without_cupy_gives_a_clear_message(recon):
    try:
        import cupyx  # noqa: F401, PLC0415  (optional GPU module: the test skips where it is installed)

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
