"""Probe ranges, Cartesian parameters, the probe-conditioned pieces and the probe search."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from py4dstem_deepcdi.inference import predict
from py4dstem_deepcdi.models import DeepCDIModel
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import AberrationRanges, from_cartesian, to_cartesian
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
        small_recon, initial={"C10": -110.0}, n_pairs=20, n_iterations=60, n_trials=30, progress=False
    )
    errors = aberration_errors(result.aberrations, from_cartesian(target))
    assert abs(errors["C10"]) < 3 and errors["C12"] < 3 and errors["C21"] < 40 and errors["C23"] < 40, errors
    assert result.loss < result.initial_loss and np.all(np.diff(result.history) <= 0)
    assert result.trial_losses.shape == (60, 30) and result.evaluations == 1 + 60 * 30
    fig = result.visualize()
    assert len(fig.axes) >= 5
    only_defocus = recover_probe(
        small_recon, initial={"C10": -110.0}, n_iterations=5, n_trials=4, search=("C10",), progress=False
    )
    assert only_defocus.aberrations["C12"] == 0 and only_defocus.aberrations["C21"] == 0


def test_recovered_probe_feeds_a_reconstruction(small_recon, conditioned, geometry):
    result = recover_probe(small_recon, initial={"C10": -90.0}, n_pairs=10, n_iterations=2, n_trials=3, progress=False)
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
    with pytest.raises(ValueError, match="probe-conditioned model"):
        recover_probe(small_recon.datacube, fixed, energy=300e3, semiangle_cutoff=17.1)
    with pytest.raises(ValueError, match="inverted"):
        recover_probe(small_recon, ranges=AberrationRanges(C10=(-60.0, -120.0)))
    with pytest.raises(ValueError, match="leave the model's training ranges"):
        recover_probe(small_recon, ranges=AberrationRanges(C10=(-150.0, -60.0), C12=25, C21=300, C23=300))
    with pytest.raises(ValueError, match="outside the search ranges"):
        recover_probe(small_recon, initial={"C10": -20.0})
    with pytest.raises(ValueError, match="n_trials"):
        recover_probe(small_recon, n_trials=0)
    with pytest.raises(ValueError, match="no pair"):
        recover_probe(small_recon, pair_distance=100.0, progress=False)
    with pytest.raises(ValueError, match="energy"):
        recover_probe(small_recon.datacube, conditioned)
    with pytest.raises(ValueError, match="training ranges|was trained for probes"):
        DeepCDIReconstruction(small_recon.datacube, 300e3, 17.1, model=conditioned, C10=-10.0)


def test_recovery_options_defaults_help_and_checks():
    """The search keywords of recover_probe take their defaults from RecoveryOptions, each field has a help line,
    and bad settings are refused when the options are built."""
    signature = inspect.signature(recover_probe)
    for f in dataclasses.fields(RecoveryOptions):
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
        search=("C10",), precision="fp32", progress=False,
    )  # fmt: skip
    settings = result.settings
    assert settings["n_pairs"] == len(result.pairs) <= 6 and settings["pair_distance_A"] == 0.6
    assert settings["stride_steps"] == 2 and settings["search"] == ["C10"] and settings["precision"] == "fp32"
    assert settings["ranges"] == RANGES.to_dict()
