"""compare_with_epie and score_reconstruction (comparison/compare.py): alignment chain, numbers, refusals."""

import json
import warnings

import numpy as np
import pytest
import torch
from comparison_cases import (
    EPIE_ITERATIONS,
    comparison,
    geometry,
    oracle,
    reconstruction,
)

from py4dstem_deepcdi.comparison import Comparison, compare_with_epie, run_epie, score_reconstruction
from py4dstem_deepcdi.simulation import simulate_dataset

torch.set_num_threads(1)


def test_oracle_reconstruction_aligns_with_epie_and_truth(recon, ds):
    c = compare_with_epie(oracle(recon, ds), epie=comparison().epie, ground_truth=ds, progress=False, adf=False)
    assert c.vs_truth["deep_cdi"]["correlation"] > 0.999
    assert c.correlation >= 0.9
    assert np.hypot(*c.registration["shift_px"]) < 0.25  # the positions alone align the two images
    assert c.registration["applied"]


def test_end_to_end_numbers(recon):
    c = comparison()
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
    assert t["epie_s"] > 0 and t["positions"] == 144 and t["epie_iterations"] == EPIE_ITERATIONS
    assert t["epie_over_deep_cdi"] == pytest.approx(t["epie_s"] / t["deep_cdi_s"])
    # offsets removed from every image
    for image in (c.deep_phase, c.epie_phase, c.truth_phase):
        assert abs(float(image.mean())) < 1e-5
    summary = c.summary()
    json.dumps(summary)
    assert summary["vs_truth"]["epie"]["correlation"] == c.vs_truth["epie"]["correlation"]
    assert "FRC resolution" in repr(c) and "ePIE vs truth" in repr(c)
    assert c.adf is not None and c.adf.shape == (12, 12) and np.all(np.isfinite(c.adf))
    # the deep-CDI image is the reconstruction's phase over the box, offset removed
    r0, r1, c0, c1 = c.box
    deep = recon.object_phase[r0:r1, c0:c1]
    np.testing.assert_allclose(c.deep_phase, deep - deep.mean(), atol=1e-5)
    assert c.scan_step == pytest.approx((0.5, 0.5))


def test_score_reconstruction_agrees_with_the_comparison(recon, ds):
    s = score_reconstruction(recon, ds)
    c = comparison()
    assert s["box"] == c.box  # ePIE's field of view and object cover the whole deep-CDI field of view here
    assert s["correlation"] == pytest.approx(c.vs_truth["deep_cdi"]["correlation"], abs=1e-9)
    assert s["rms_rad"] == pytest.approx(c.vs_truth["deep_cdi"]["rms_rad"], abs=1e-9)
    perfect = score_reconstruction(oracle(recon, ds), ds, remove_ramp=True)
    assert perfect["correlation"] > 0.999 and perfect["phase_scale"] == pytest.approx(1.0, abs=0.01)
    with pytest.raises(TypeError, match="ground_truth"):
        score_reconstruction(recon, None)


def test_no_ground_truth_no_truth_scores(recon):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compare_with_epie(recon, epie=comparison().epie, progress=False, adf=False, register=False)
    assert c.truth_phase is None and c.vs_truth is None and c.epie_truth_correlation is None
    assert c.registration == {"shift_px": [0.0, 0.0], "applied": False, "max_shift_px": 2.0}
    assert c.adf is None and "adf=False" in c.adf_info["reason"]
    assert "vs_truth" not in c.summary()


def test_reconstruction_must_be_finished(ds):
    recon = reconstruction(ds, geometry(), reconstruct=False)
    with pytest.raises(RuntimeError, match="finished"):
        compare_with_epie(recon, num_iter=1)
    recon.preprocess()
    with pytest.raises(RuntimeError, match="finished"):
        compare_with_epie(recon, num_iter=1)
    with pytest.raises(RuntimeError, match="reconstruct"):
        score_reconstruction(recon, ds)
    with pytest.raises(TypeError, match="DeepCDIReconstruction"):
        compare_with_epie(ds.datacube)


def test_fields_of_view_that_do_not_overlap(recon):
    elsewhere = run_epie(recon, num_iter=1, positions=recon.positions + 100.0, progress=False)  # 100 Å away
    with pytest.raises(ValueError, match="do not overlap"):
        compare_with_epie(recon, epie=elsewhere, progress=False)


def test_ground_truth_from_another_scan_is_refused(recon, ds):
    wrong = (ds.phase, ds.sampling, ds.positions[:, ::-1])  # transposed positions
    with pytest.raises(ValueError, match="ground-truth positions"):
        compare_with_epie(recon, epie=comparison().epie, ground_truth=wrong, progress=False)


def test_subsampled_rotated_scan():
    """subsample=2 in deep CDI: ePIE gets every second pattern with twice the step, and still finds the truth."""
    geom = geometry()
    ds = simulate_dataset(geom, scan_shape=(20, 20), scan_step=0.4, electrons=1e6, seed=4, rotation_deg=10)
    recon = reconstruction(ds, geom, rotation_deg=10, subsample=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compare_with_epie(recon, num_iter=EPIE_ITERATIONS, ground_truth=ds, progress=False, adf=False)
    assert len(c.epie.positions_A) == 100
    assert c.epie.parameters["scan_step_A"] == pytest.approx([0.8, 0.8])
    assert c.vs_truth["epie"]["correlation"] >= 0.9
