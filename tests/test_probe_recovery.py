"""Probe ranges, Cartesian parameters, the overlap search (probe-conditioned network) and the default ePIE search.

The ePIE tests run the real loss (py4DSTEM's ptychography) on small simulated scans."""

import dataclasses
import inspect
import json
import warnings

import numpy as np
import pytest
import torch

from py4dstem_deepcdi.cli import main
from py4dstem_deepcdi.inference import predict
from py4dstem_deepcdi.models import DeepCDIModel
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import AberrationRanges, from_cartesian, to_cartesian
from py4dstem_deepcdi.probe_epie import EPIESearchOptions, scan_blocks
from py4dstem_deepcdi.probe_recovery import (
    OverlapLoss,
    RecoveryOptions,
    aberration_errors,
    fit_probe_aberrations,
    neighbour_pairs,
    recover_probe,
)
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.simulation import simulate_dataset

RANGES = AberrationRanges(C10=(-120.0, -60.0), C12=25.0, C21=300.0, C23=300.0)


def to_polar_names(search):
    """The polar parameters of searched aberrations: C10 alone, the others with their angle."""
    return [n for s in search for n in ((s,) if s == "C10" else (s, "phi" + s[1:]))]


@pytest.fixture(scope="module")
def conditioned(geometry):
    """A small untrained probe-conditioned model over RANGES (the reference probe: the geometry's)."""
    torch.manual_seed(0)
    network = ResUNet(width=0.125, in_channels=3).eval()
    metadata = {"name": "tiny-conditioned", "training_set": {"aberration_ranges": RANGES.to_dict()}}
    return DeepCDIModel(network, geometry, metadata)


# ---------------------------------------------------------------------------------------------- parameters
def test_cartesian_round_trip_and_convention(geometry, rng):
    """Cartesian (a, b) = C (cos nφ, sin nφ), and χ built from them equals the phase of py4DSTEM's probe."""
    for v in RANGES.sample(5, rng):
        polar = from_cartesian(v)
        np.testing.assert_allclose(to_cartesian(polar), v, atol=1e-9)
        g = geometry.replace(aberrations=polar)
        n = g.detector_shape[0]
        k = (np.arange(n) - n // 2) * g.reciprocal_sampling
        kx, ky = np.meshgrid(k, k, indexing="ij")
        alpha, phi = g.wavelength * np.hypot(kx, ky), np.arctan2(ky, kx)
        c10, c12a, c12b, c21a, c21b, c23a, c23b = v
        chi = 2 * np.pi / g.wavelength * (
            alpha**2 / 2 * (c10 + c12a * np.cos(2 * phi) + c12b * np.sin(2 * phi))
            + alpha**3 / 3 * (c21a * np.cos(phi) + c21b * np.sin(phi) + c23a * np.cos(3 * phi) + c23b * np.sin(3 * phi))
        )
        fourier = g.probe_fourier
        inside = np.abs(fourier) > 0.5 * np.abs(fourier).max()
        # the probe is centred in real space, so the DC-relative phase carries no extra ramp; compare exp(-iχ)
        ratio = fourier[inside] / np.abs(fourier[inside]) * np.exp(1j * chi[inside])
        ratio /= ratio[np.argmax(np.abs(fourier[inside]))]
        assert np.abs(np.angle(ratio)).max() < 1e-3


def test_ranges_sample_clip_contains():
    v = RANGES.sample(2000, np.random.default_rng(1))
    lo, hi = RANGES.bounds()
    assert np.all(v[:, 0] >= -120) and np.all(v[:, 0] <= -60)
    assert np.hypot(v[:, 1], v[:, 2]).max() <= 25 + 1e-9 and np.hypot(v[:, 5], v[:, 6]).max() <= 300 + 1e-9
    np.testing.assert_allclose(RANGES.clip(v), v)
    far = RANGES.clip(np.array([[0.0, 100, 0, 0, 1000, 0, 0]]))[0]
    np.testing.assert_allclose(far, [-60, 25, 0, 0, 300, 0, 0])
    assert RANGES.contains({"C10": -100, "C12": 10}) == []
    assert "C10" in RANGES.contains({"C10": -200})[0] and "C21" in RANGES.contains({"C10": -100, "C21": 400})[0]
    assert AberrationRanges.from_dict(RANGES.to_dict()) == RANGES


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"C10": (50.0, -50.0)}, "inverted"),
        ({"C10": (10.0, 10.0)}, "empty"),
        ({"C12": -1.0}, ">= 0"),
        ({"C21": float("nan")}, ">= 0"),
        ({"C10": (float("nan"), 1.0)}, "finite"),
        ({"C10": 5.0}, "pair"),
    ],
)
def test_ranges_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AberrationRanges(**kwargs)


def test_ranges_too_wide_for_the_window(geometry):
    with pytest.raises(ValueError, match="too wide for this geometry.*C10=-300"):
        AberrationRanges().check(geometry)  # ±300 Å defocus does not fit a 9.8 Å window
    RANGES.check(geometry)


def test_fit_probe_aberrations_recovers_known_probe(geometry, rng):
    """py4DSTEM's aberration-surface fit, read back as the 7 parameters, returns those the probe was built with."""
    for v in RANGES.sample(3, rng):
        truth = from_cartesian(v)
        fitted = fit_probe_aberrations(geometry.replace(aberrations=truth).probe, geometry)
        errors = aberration_errors(fitted, truth)
        assert abs(errors["C10"]) < 1.0 and errors["C12"] < 1.0, (truth, fitted)
        assert errors["C21"] < 10 and errors["C23"] < 10, (truth, fitted)
    with pytest.raises(ValueError, match="complex array"):
        fit_probe_aberrations(np.ones((8, 8)), geometry)


# ---------------------------------------------------------------------------------------------- pairs and loss
def test_neighbour_pairs():
    indices, pairs = neighbour_pairs((40, 40), stride=3, n_pairs=100)
    assert len(pairs) == 100 and len(indices) == 64  # an 8×8 block has 112 pairs
    pos = np.stack([indices // 40, indices % 40], 1)
    steps = np.abs(pos[pairs[:, 1]] - pos[pairs[:, 0]])
    assert sorted(map(tuple, np.unique(steps, axis=0).tolist())) == [(0, 3), (3, 0)]
    _, few = neighbour_pairs((4, 1), stride=1, n_pairs=100)
    assert len(few) == 3  # a line scan has 3 pairs
    with pytest.raises(ValueError, match="no pair"):
        neighbour_pairs((1, 1), stride=1, n_pairs=10)
    with pytest.raises(ValueError, match="no pair"):
        neighbour_pairs((3, 3), stride=5, n_pairs=10)


def _exact_patches(geometry, positions_px, offsets):
    """Masked patches of a smooth random object cut at integer pixel positions, each with an added offset."""
    n = geometry.detector_shape[0]
    rng = np.random.default_rng(2)
    low_pass = np.exp(-np.add.outer(*(np.fft.fftfreq(96) ** 2,) * 2) * 400)
    obj = np.fft.ifft2(np.fft.fft2(rng.standard_normal((96, 96))) * low_pass).real
    obj /= obj.std()
    out = []
    for (px, py), c in zip(positions_px, offsets):
        patch = obj[px - n // 2 : px + n - n // 2, py - n // 2 : py + n - n // 2]
        out.append((patch + c) * geometry.mask)
    return np.stack(out)


def test_overlap_loss_zero_for_consistent_patches_and_positive_otherwise(conditioned, geometry, monkeypatch):
    """Patches cut from one object agree in their overlaps whatever their offsets (loss 0); the wrong shift sign
    or shuffled patches do not."""
    positions_px = np.array([[40, 40], [40, 43], [43, 40], [43, 43]])
    pairs = np.array([[0, 1], [0, 2], [1, 3], [2, 3]])
    patches = torch.as_tensor(_exact_patches(geometry, positions_px, [0.0, 1.5, -2.0, 0.3]), dtype=torch.float32)
    masks = torch.as_tensor(geometry.mask, dtype=torch.float32)[None]

    def run(positions, p):
        positions_a = positions * np.array(geometry.sampling)
        loss = OverlapLoss(conditioned, np.zeros((4, 32, 32)), positions_a, pairs, precision="fp32")
        monkeypatch.setattr(loss, "patches", lambda geometries: (p[None].expand(len(geometries), -1, -1, -1), masks))
        return float(loss(np.zeros((1, 7)))[0])

    assert run(positions_px, patches) < 1e-5
    assert run(-positions_px, patches) > 0.3  # the shift convention matters
    assert run(positions_px, patches[[3, 2, 1, 0]]) > 0.3


def test_overlap_loss_penalises_no_overlap(conditioned, geometry, monkeypatch):
    positions_px = np.array([[0, 0], [0, 30]])  # masks do not overlap
    positions = positions_px * np.array(geometry.sampling)
    loss = OverlapLoss(conditioned, np.zeros((2, 32, 32)), positions, np.array([[0, 1]]))
    assert float(loss(to_cartesian(geometry.aberrations)[None])[0]) == 1.0


def test_overlap_loss_runs_the_network_on_each_candidate(conditioned, geometry):
    """The patches of a candidate are the network's output for (amplitude, that probe), masked and zero-mean."""
    rng = np.random.default_rng(3)
    amplitudes = rng.random((3, 32, 32)).astype(np.float32)
    loss = OverlapLoss(conditioned, amplitudes, np.zeros((3, 2)), np.array([[0, 1]]), precision="fp32")
    candidates = RANGES.sample(2, rng)
    geometries = loss.geometries(candidates)
    patches, masks = loss.patches(geometries)
    for t, g in enumerate(geometries):
        expected = predict(conditioned, amplitudes, precision="fp32", geometry=g)
        np.testing.assert_allclose(patches[t].numpy(), expected, atol=2e-5)
        np.testing.assert_array_equal(masks[t].numpy().astype(bool), g.mask)


# ---------------------------------------------------------------------------------------------- the search
@pytest.fixture(scope="module")
def small_recon(conditioned, geometry):
    ds = simulate_dataset(geometry, scan_shape=(12, 12), scan_step=0.3, seed=0)
    return DeepCDIReconstruction(
        ds.datacube, geometry.energy, geometry.semiangle_cutoff, model=conditioned, rotation_deg=0.0, transpose=False,
        verbose=False, **geometry.aberrations,
    ).preprocess()


def test_search_finds_the_minimum_of_a_known_loss(small_recon, monkeypatch):
    """With the loss replaced by a bowl around a known probe, the stochastic search walks to it."""
    target = np.array([-75.0, 10.0, -12.0, 120.0, 50.0, -100.0, 80.0])
    scale = np.array([30, 12, 12, 150, 150, 150, 150])
    monkeypatch.setattr(OverlapLoss, "__call__", lambda self, v: (np.abs((np.atleast_2d(v) - target) / scale)).sum(1))
    result = recover_probe(
        small_recon, initial={"C10": -110.0}, n_pairs=20, n_iterations=60, n_trials=30, progress=False,
        method="overlap",
    )
    errors = aberration_errors(result.aberrations, from_cartesian(target))
    assert abs(errors["C10"]) < 3 and errors["C12"] < 3 and errors["C21"] < 40 and errors["C23"] < 40, errors
    assert result.loss < result.initial_loss and np.all(np.diff(result.search.history) <= 0)
    assert result.search.trials.shape == (60, 30) and result.evaluations == 1 + 60 * 30
    assert result.method == "overlap" and set(result.from_data) == set(to_polar_names(("C10", "C12", "C21", "C23")))
    assert "history" in result.to_dict() and result.to_dict()["uncertainty"]["C10"] is None  # no error estimate
    fig = result.visualize()
    assert len(fig.axes) >= 4
    only_defocus = recover_probe(
        small_recon, initial={"C10": -110.0}, n_iterations=5, n_trials=4, search=("C10",), progress=False,
        method="overlap",
    )
    assert only_defocus.aberrations["C12"] == 0 and only_defocus.aberrations["C21"] == 0
    assert only_defocus.from_data == ("C10",) and "C12" in only_defocus.assumed


def test_recovered_probe_feeds_a_reconstruction(small_recon, conditioned, geometry):
    result = recover_probe(small_recon, initial={"C10": -90.0}, n_pairs=10, n_iterations=2, n_trials=3, progress=False,
                           method="overlap")
    recon = DeepCDIReconstruction(
        small_recon.datacube, geometry.energy, geometry.semiangle_cutoff, model=conditioned, rotation_deg=0.0,
        transpose=False, verbose=False, probe=result,
    )
    assert recon.geometry.aberrations == pytest.approx(result.aberrations)
    recon.preprocess().reconstruct(precision="fp32", progress=False)
    assert recon.object_phase.shape[0] > 32
    np.testing.assert_array_equal(recon.probe_geometry.mask, result.geometry.mask)


def test_recover_probe_bad_input(small_recon, conditioned, geometry):
    fixed = DeepCDIModel(ResUNet(width=0.125).eval(), geometry, {"name": "fixed"})
    overlap = {"method": "overlap"}
    with pytest.raises(ValueError, match="probe-conditioned model"):
        recover_probe(small_recon.datacube, fixed, energy=300e3, semiangle_cutoff=17.1, **overlap)
    with pytest.raises(ValueError, match="inverted"):
        recover_probe(small_recon, ranges=AberrationRanges(C10=(-60.0, -120.0)), **overlap)
    with pytest.raises(ValueError, match="leave the model's training ranges"):
        recover_probe(small_recon, ranges=AberrationRanges(C10=(-150.0, -60.0), C12=25, C21=300, C23=300), **overlap)
    with pytest.raises(ValueError, match="outside the search ranges"):
        recover_probe(small_recon, initial={"C10": -20.0}, **overlap)
    with pytest.raises(ValueError, match="n_trials"):
        recover_probe(small_recon, n_trials=0, **overlap)
    with pytest.raises(ValueError, match="no pair"):
        recover_probe(small_recon, pair_distance=100.0, progress=False, **overlap)
    with pytest.raises(ValueError, match="energy"):
        recover_probe(small_recon.datacube, conditioned, **overlap)
    with pytest.raises(ValueError, match="method must be one of"):
        recover_probe(small_recon, method="simplex")
    with pytest.raises(ValueError, match="training ranges|was trained for probes"):
        DeepCDIReconstruction(small_recon.datacube, 300e3, 17.1, model=conditioned, C10=-10.0)


def test_recovery_options_defaults_help_and_checks():
    """The search keywords of recover_probe take their defaults from RecoveryOptions and EPIESearchOptions (search:
    None, the method's own default), each field has a help line, and bad settings are refused when the options are
    built."""
    signature = inspect.signature(recover_probe)
    assert signature.parameters["method"].default == "epie" and signature.parameters["search"].default is None
    for cls in (RecoveryOptions, EPIESearchOptions):
        for f in dataclasses.fields(cls):
            if f.name != "search":
                assert signature.parameters[f.name].default == f.default, f.name
                assert f.metadata["help"], f.name
    options = RecoveryOptions(n_pairs=5.0, search=["C10"])
    assert options.n_pairs == 5 and options.search == ("C10",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.n_pairs = 3
    for bad, match in [
        ({"n_iterations": 0}, "n_iterations"),
        ({"search": ("C30",)}, "search names"),
        ({"final_radius": 0.0}, "final_radius"),
        ({"pair_distance": -1.0}, "pair_distance"),
        ({"precision": "fp16"}, "precision"),
    ]:
        with pytest.raises(ValueError, match=match):
            RecoveryOptions(**bad)


def test_recover_probe_records_its_settings(small_recon):
    result = recover_probe(
        small_recon, initial={"C10": -90.0}, n_pairs=6, n_iterations=2, n_trials=2, pair_distance=0.6,
        search=("C10",), precision="fp32", progress=False, method="overlap",
    )  # fmt: skip
    settings = result.settings
    assert settings["n_pairs"] == len(result.search.pairs) <= 6 and settings["pair_distance_A"] == 0.6
    assert settings["stride_steps"] == 2 and settings["search"] == ["C10"] and settings["precision"] == "fp32"
    assert settings["ranges"] == RANGES.to_dict()


# ---------------------------------------------------------------------------------------------- method="epie"
EPIE_TRUTH = {"C10": -90.0, "C12": 10.0, "phi12": 0.5}


def _epie_keywords(geometry, **extra):
    """The calibration keywords of a simulated scan (its rotation is 0, not transposed)."""
    return {"energy": geometry.energy, "semiangle_cutoff": geometry.semiangle_cutoff, "rotation_deg": 0.0,
            "transpose": False, "rolloff": geometry.rolloff, "progress": False, **extra}


@pytest.fixture(scope="module")
def epie_scan(geometry):
    """A 16×16 scan at 0.5 Å with a known probe (C10 −90 Å, C12 10 Å)."""
    return simulate_dataset(geometry.replace(aberrations=EPIE_TRUTH), scan_shape=(16, 16), scan_step=0.5, seed=3)


@pytest.fixture(scope="module")
def epie_result(epie_scan, geometry):
    """The search from 25 Å off in defocus and no astigmatism (15 ePIE passes: a block this small needs more than
    the default to come within 3 Å, docs/probe_recovery.md)."""
    return recover_probe(
        epie_scan.datacube, initial={"C10": -65.0}, **_epie_keywords(geometry, block=16, epie_iterations=15)
    )


def test_epie_recovers_a_known_probe(epie_result):
    """The real ePIE data error, minimised from 25 Å off, finds C10 and C12 within 3 Å; coma and threefold stay as
    given, and the result says so."""
    errors = aberration_errors(epie_result.aberrations, EPIE_TRUTH)
    assert abs(errors["C10"]) < 3 and errors["C12"] < 3, (epie_result.aberrations, errors)
    assert epie_result.loss < epie_result.initial_loss
    assert epie_result.method == "epie" and epie_result.from_data == ("C10", "C12", "phi12")
    assert epie_result.assumed == ("C21", "phi21", "C23", "phi23") and epie_result.aberrations["C21"] == 0
    assert set(epie_result.uncertainty) == set(epie_result.from_data)
    assert all(np.isfinite(v) and v >= 0 for v in epie_result.uncertainty.values())
    search = epie_result.search
    assert search.blocks.shape == (4, 4) and tuple(search.main_block) == (0, 16, 0, 16)
    assert epie_result.evaluations == len(search.vectors) >= 15


def test_epie_result_feeds_a_reconstruction_and_a_file(epie_result, epie_scan, conditioned, geometry, tmp_path):
    """DeepCDIReconstruction(probe=result) takes the recovered aberrations; to_dict is what `reconstruct --probe`
    reads, with what came from the data and the error estimates."""
    recon = DeepCDIReconstruction(
        epie_scan.datacube, geometry.energy, geometry.semiangle_cutoff, model=conditioned, rotation_deg=0.0,
        transpose=False, verbose=False, probe=epie_result,
    )  # fmt: skip
    assert recon.probe_geometry.aberrations == pytest.approx(epie_result.aberrations)
    assert recon.probe_source["method"] == "epie" and recon.probe_source["from_data"] == ["C10", "C12", "phi12"]
    assert set(recon.probe_source["uncertainty"]) == {"C10", "C12", "phi12"}
    summary = json.loads(json.dumps(epie_result.to_dict()))
    assert summary["aberrations"] == pytest.approx(epie_result.aberrations) and summary["method"] == "epie"
    assert summary["from_data"] == ["C10", "C12", "phi12"] and "C21" in summary["assumed"]
    assert set(summary["uncertainty"]) == {"C10", "C12", "phi12"} and summary["warnings"] == []
    assert "C10=" in repr(epie_result) and "assumed C21" in repr(epie_result)
    assert len(epie_result.visualize(path=tmp_path / "probe.png").axes) >= 4 and (tmp_path / "probe.png").is_file()


def test_epie_from_a_reconstruction_and_its_vacuum(epie_scan, conditioned, geometry):
    """A reconstruction brings its data, calibration and aberrations (the start); a vacuum pattern on the data's
    detector (here the simulation's own aperture) is the aperture."""
    recon = DeepCDIReconstruction(
        epie_scan.datacube, geometry.energy, geometry.semiangle_cutoff, model=conditioned, rotation_deg=0.0,
        transpose=False, verbose=False, C10=-110.0, vacuum_probe_intensity=np.abs(geometry.probe_fourier) ** 2,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="no error estimate"):
        result = recover_probe(recon, block=16, n_blocks=1, radii=(5.0,), epie_iterations=2, progress=False)
    assert result.initial["C10"] == -110.0 and result.settings["vacuum_probe"]
    assert result.settings["rotation_deg"] == 0.0 and result.settings["scan_step_A"] == pytest.approx(0.5)
    assert not np.isfinite(result.uncertainty["C10"])  # one block: no error estimate, and a warning says so
    assert any("C10 is ill-conditioned" in m for m in result.warnings)


def test_epie_warns_about_coma_at_a_small_semiangle(geometry):
    """Coma at 17 mrad changes the edge phase by ~5e-4 rad per Å: its estimate is flagged as ill-conditioned."""
    ds = simulate_dataset(geometry, scan_shape=(12, 12), scan_step=0.3, seed=4)
    with pytest.warns(UserWarning, match="C21 is ill-conditioned.*rad at the aperture edge"):
        result = recover_probe(
            ds.datacube, initial=geometry.aberrations, search=("C10", "C21"), radii=(5.0,), epie_iterations=2,
            **_epie_keywords(geometry, block=12),
        )  # fmt: skip
    assert result.from_data == ("C10", "C21", "phi21") and any("C21" in m for m in result.warnings)


def test_scan_blocks():
    main, subs = scan_blocks((100, 60), 40, 4)
    assert tuple(main) == (30, 70, 10, 50)
    assert subs.tolist() == [[30, 50, 10, 30], [30, 50, 30, 50], [50, 70, 10, 30], [50, 70, 30, 50]]
    main, subs = scan_blocks((12, 30), 40, 1)
    assert tuple(main) == (0, 12, 0, 30) and len(subs) == 0
    assert scan_blocks((10, 10), 40, 4)[1].tolist() == [[0, 5, 0, 5], [0, 5, 5, 10], [5, 10, 0, 5], [5, 10, 5, 10]]
    assert scan_blocks((8, 8), 40, 9)[1].shape == (0, 4)  # sub-blocks of 4 or 2 positions: no error estimate


def test_epie_refuses_bad_input(geometry, epie_scan):
    """No overlap, too few positions, ranges or a start that do not fit the window, and missing inputs are refused
    with the reason, before any search."""
    flat = np.ones((8, 8, 32, 32), dtype=np.float32)
    kw = _epie_keywords(geometry, scan_step=0.3, angular_sampling=2.0)
    start = {"C10": -90.0}
    with pytest.raises(ValueError, match="no overlap"):
        recover_probe(flat, initial=start, **{**kw, "scan_step": 5.0})
    with pytest.raises(ValueError, match="too few"):
        recover_probe(flat[:4, :4], initial=start, **kw)
    with pytest.raises(ValueError, match="too wide for this geometry"):
        recover_probe(flat, initial=start, ranges=AberrationRanges(), **kw)
    with pytest.raises(ValueError, match="undersampled"):
        recover_probe(flat, initial={"C10": -400.0}, **kw)
    with pytest.raises(ValueError, match="outside the search ranges"):
        recover_probe(flat, initial=start, ranges=AberrationRanges(C10=(-80.0, -60.0)), **kw)
    with pytest.raises(ValueError, match="initial aberrations"):
        recover_probe(flat, **kw)
    with pytest.raises(ValueError, match="energy"):
        recover_probe(flat, initial=start, semiangle_cutoff=17.1, scan_step=0.3, angular_sampling=2.0)
    with pytest.raises(ValueError, match="vacuum_probe_intensity has shape"):
        recover_probe(flat, initial=start, vacuum_probe_intensity=np.ones((16, 16)), **kw)
    with pytest.raises(ValueError, match="square scan step"):
        recover_probe(flat, initial=start, **{**kw, "scan_step": (0.3, 0.4)})
    with pytest.raises(TypeError, match="unknown keywords"):
        recover_probe(flat, initial=start, model_name="x", **kw)
    with pytest.raises(TypeError, match="no data keywords"):
        recover_probe(
            DeepCDIReconstruction(epie_scan.datacube, 300e3, 17.1, verbose=False, C10=-100.0), energy=300e3
        )


@pytest.mark.parametrize(
    "bad, match",
    [({"block": 3}, "block"), ({"n_blocks": 0}, "n_blocks"), ({"epie_iterations": 0}, "epie_iterations"),
     ({"radii": (5.0, 20.0)}, "radii"), ({"radii": ()}, "radii"), ({"tolerance": 0.0}, "tolerance"),
     ({"detector_angle": 0.5}, "detector_angle"), ({"search": ("C30",)}, "search names")],
)  # fmt: skip
def test_epie_options_refuse_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        EPIESearchOptions(**bad)


@pytest.mark.slow
def test_epie_recovers_the_bench_probe_within_3_angstrom(geometry):
    """The benchmark's case (40×40 scan at 0.25 Å, random coma and threefold up to 300 Å), 30 Å off."""
    truth = from_cartesian(RANGES.sample(1, np.random.default_rng(1002))[0])
    ds = simulate_dataset(geometry.replace(aberrations=truth), scan_shape=(40, 40), scan_step=0.25, seed=2)
    result = recover_probe(ds.datacube, initial={"C10": truth["C10"] + 30}, **_epie_keywords(geometry))
    errors = aberration_errors(result.aberrations, truth)
    assert abs(errors["C10"]) < 3 and errors["C12"] < 3, errors


def test_cli_recover_probe_by_epie_then_reconstruct(tmp_path, capsys):
    """`deepcdi recover-probe` (default --method epie; start and aperture from the shipped model, --C10 overriding)
    writes what came from the data; `reconstruct --probe` uses it; `--method overlap` needs a conditioned model."""
    data, found, common = tmp_path / "data.h5", tmp_path / "probe.json", ["--energy", "300e3", "--semiangle", "17.1",
                                                                       "--rotation", "0", "--no-transpose", "--quiet"]
    assert main(["simulate", "--output", str(data), "--scan", "16", "16", "--step", "0.4"]) == 0
    assert main(["recover-probe", str(data), "--output", str(found), "--C10", "-75", "--block", "16", *common]) == 0
    result = json.loads(found.read_text())
    assert abs(result["aberrations"]["C10"] + 100) < 3 and result["aberrations"]["C12"] < 3, result["aberrations"]
    assert result["method"] == "epie" and result["from_data"] == ["C10", "C12", "phi12"]
    assert result["uncertainty"]["C10"] > 0 and result["initial"]["C10"] == -75
    assert main(["reconstruct", str(data), "--output", str(tmp_path / "phase.h5"), "--probe", str(found), *common]) == 0
    capsys.readouterr()
    code = main(["recover-probe", str(data), "--output", str(tmp_path / "x.json"), "--method", "overlap", *common])
    assert code == 2 and "needs a probe-conditioned model" in capsys.readouterr().err


def test_epie_names_the_aperture_when_the_search_runs_away(epie_scan, geometry):
    """With a sharp aperture model for data taken with a 2 mrad roll-off, the data error keeps falling towards larger
    probes; the search is stopped where the probe leaves the window, and the message names the aperture."""
    with pytest.raises(ValueError, match="aperture model matches the data"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recover_probe(epie_scan.datacube, initial={"C10": -65.0}, **_epie_keywords(geometry, block=16, rolloff=0.0))
