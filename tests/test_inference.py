"""Inference: prediction (masking, de-meaning, batching, streaming), input checks, symmetries, its use of the cache."""

import numpy as np
import pytest
import torch
from networks import random_network, randomise_batchnorms
from torch import nn

from py4dstem_deepcdi.encoding import pooled_illumination, remove_mask_mean
from py4dstem_deepcdi.inference import apply_symmetry, predict, predict_batches, probe_symmetries
from py4dstem_deepcdi.models import DeepCDIModel
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.runtime import clear_cache, prepared_network
from py4dstem_deepcdi.scan import neighbour_offsets
from py4dstem_deepcdi.simulation import ForwardModel
from py4dstem_deepcdi.stream import StreamConfig, TrainingStream

WIDTH = 0.25
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def geometry_small():
    return ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)


@pytest.fixture(scope="module")
def network():
    return random_network(WIDTH)


@pytest.fixture(scope="module")
def amplitudes(geometry_small):
    x, _ = TrainingStream(geometry_small, StreamConfig(batch_size=24), seed=3).batch(0)
    return x[:, 0].numpy()


@pytest.fixture
def model(network, geometry_small):
    return DeepCDIModel(network, geometry_small, {"name": "test"})


def _reference(network: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return network(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None])


def test_compile_failing_at_first_call_falls_back_to_eager(model, amplitudes, monkeypatch):
    calls = []

    def lazy_broken(module, **kwargs):
        def run(x):
            calls.append(len(x))
            raise RuntimeError("C++ compile error")

        return run

    monkeypatch.setattr(torch, "compile", lazy_broken)
    clear_cache(model)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ compile error"):
        got = predict(model, amplitudes[:5], precision="fp32", compile=True, batch_size=8)
    assert calls == [8]  # the short batch was padded to the compiled batch size
    expected = predict(model, amplitudes[:5], precision="fp32", batch_size=8)
    assert np.abs(got - expected).max() < 1e-6
    prepared = prepared_network(model, "fp32", "cpu", compile=True)
    assert not prepared.compiled  # sticky: no second attempt


def test_predict_masks_and_demeans(model, amplitudes):
    mask = model.geometry.mask
    out = predict(model, amplitudes, precision="fp32", batch_size=8)
    assert out.dtype == np.float32 and out.shape == amplitudes.shape
    assert np.all(out[:, ~mask] == 0)
    assert np.abs(out[:, mask].mean(axis=1)).max() < 1e-6
    raw = _reference(model.network, amplitudes)[:, 0].numpy()
    inside = raw[:, mask]
    expected = np.zeros_like(raw)
    expected[:, mask] = inside - inside.mean(axis=1, keepdims=True)
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(out - expected).max() < 1e-5 * scale


def test_predict_accepts_torch_and_float64(model, amplitudes):
    a = predict(model, amplitudes, precision="fp32", batch_size=8)
    b = predict(model, torch.from_numpy(amplitudes.astype(np.float64)), precision="fp32", batch_size=8)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_batch_size_does_not_change_the_result(model, amplitudes):
    one = predict(model, amplitudes[:6], precision="fp32", batch_size=1)
    many = predict(model, amplitudes[:6], precision="fp32", batch_size=1000)
    scale = np.abs(many).max()
    assert np.abs(one - many).max() < 1e-5 * scale


def test_streaming_equals_one_call(model, amplitudes):
    whole = predict(model, amplitudes, precision="fp32", batch_size=8)
    chunks = (amplitudes[s:e] for s, e in ((0, 5), (5, 19), (19, 24)))
    parts = list(predict_batches(model, chunks, precision="fp32", batch_size=8))
    assert [len(p) for p in parts] == [5, 14, 5]
    scale = np.abs(whole).max()
    assert np.abs(np.concatenate(parts) - whole).max() < 1e-5 * scale


def test_predict_bf16_default_close_to_fp32(model, amplitudes):
    fp32 = predict(model, amplitudes, precision="fp32", batch_size=8)
    default = predict(model, amplitudes, progress=True, batch_size=8)
    diff = np.abs(default - fp32)[:, model.geometry.mask]
    scale = np.abs(fp32).max()
    print(f"predict bf16 vs fp32: max {diff.max():.2e} rad, mean {diff.mean():.2e} rad, max |phase| {scale:.3f} rad")
    assert diff.max() < 0.1 * scale and diff.mean() < 0.02 * scale
    assert np.all(default[:, ~model.geometry.mask] == 0)


def test_prepared_network_is_cached_and_refreshed(model, amplitudes):
    clear_cache(model)
    predict(model, amplitudes[:8], precision="fp32", batch_size=8)
    first = prepared_network(model, "fp32", "cpu")
    predict(model, amplitudes[:8], precision="fp32", batch_size=8)
    assert prepared_network(model, "fp32", "cpu") is first  # not refolded
    # changing the weights in place (as load_state_dict or an optimiser step does) refolds
    network = ResUNet(width=WIDTH)
    randomise_batchnorms(network, seed=5)
    changed = DeepCDIModel(network, model.geometry)
    before = predict(changed, amplitudes[:8], precision="fp32", batch_size=8)
    with torch.no_grad():
        network.head[1].conv2.bias.add_(0.5)
        network.head[1].conv2.weight.mul_(2.0)
    after = predict(changed, amplitudes[:8], precision="fp32", batch_size=8)
    expected = _reference(network, amplitudes[:8])[:, 0].numpy()
    mask = model.geometry.mask
    expected = (expected - expected[:, mask].mean(1)[:, None, None]) * mask
    assert np.abs(after - before).max() > 1e-3
    assert np.abs(after - expected).max() < 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones((4, 16, 16), np.float32), r"\(J, 32, 32\).*detector shape is \(32, 32\)"),
        (np.ones((32, 32), np.float32), r"\(J, 32, 32\).*single pattern"),
        (np.ones((2, 3, 32, 32), np.float32), r"\(J, 32, 32\).*Rx·Ry"),
        (np.ones((4, 32, 32), np.int32), "floating point"),
        (torch.ones((4, 32, 32), dtype=torch.int64), "floating point"),
    ],
)
def test_bad_shapes_and_dtypes(model, bad, match):
    with pytest.raises(ValueError, match=match):
        predict(model, bad)


@pytest.mark.parametrize("value, match", [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (-0.1, "negative")])
def test_bad_values(model, amplitudes, value, match):
    bad = amplitudes[:6].copy()
    bad[4, 3, 5] = value
    with pytest.raises(ValueError, match=match + r".*pattern 4"):
        predict(model, bad, precision="fp32", batch_size=4)


def test_streaming_names_the_bad_chunk(model, amplitudes):
    chunks = [amplitudes[:3], amplitudes[:3, :16, :16]]
    with pytest.raises(ValueError, match="chunk 1"):
        list(predict_batches(model, chunks, precision="fp32"))


def test_bad_batch_size(model, amplitudes):
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, amplitudes, batch_size=0)


@pytest.mark.slow
def test_real_compile_matches_eager(model, amplitudes):
    """torch.compile for real (a minute or more on 2 cores): same phases as eager, padded last batch included."""
    clear_cache(model)
    eager = predict(model, amplitudes, precision="fp32", batch_size=16)
    compiled = predict(model, amplitudes, precision="fp32", batch_size=16, compile=True)
    prepared = prepared_network(model, "fp32", "cpu", compile=True)
    assert prepared.compiled
    assert np.abs(compiled - eager).max() < 1e-4 * np.abs(eager).max()


def test_probe_symmetries_and_the_forward_model_commute(geometry):
    """A defocused round probe is invariant under the 8 symmetries of the square about (N//2, N//2); twofold
    astigmatism along axis 0 keeps the 4 reflections; coma fewer. Under a symmetry of the probe, turning the object
    turns its diffraction pattern the same way (the reason symmetrized prediction is exact physics)."""
    round_probe = geometry.replace(aberrations={"C10": -100.0})
    assert probe_symmetries(round_probe.probe) == list(range(8))
    assert probe_symmetries(geometry.replace(aberrations={"C10": -100.0, "C12": 20.0}).probe) == [0, 1, 2, 3]
    assert probe_symmetries(geometry.replace(aberrations={"C10": -100.0, "C21": 300.0, "phi21": 0.0}).probe) == [0, 2]
    x = torch.randn(3, 32, 32)
    for t in range(8):
        torch.testing.assert_close(apply_symmetry(apply_symmetry(x, t), t, inverse=True), x)
    forward = ForwardModel(round_probe)
    phase = torch.rand(2, 32, 32) * 2
    for t in range(8):
        torch.testing.assert_close(
            forward.intensity(apply_symmetry(phase, t)),
            apply_symmetry(forward.intensity(phase), t),
            atol=1e-6,
            rtol=1e-4,
        )


def test_symmetrized_prediction_averages_the_turned_patterns(geometry):
    torch.manual_seed(0)
    round_geometry = geometry.replace(aberrations={"C10": -100.0})
    model = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), round_geometry, {})
    amplitudes = np.random.default_rng(0).random((5, 32, 32)).astype(np.float32)
    turned = [apply_symmetry(torch.from_numpy(amplitudes), t).numpy() for t in range(8)]
    plain = [predict(model, a, precision="fp32") for a in turned]
    expected = np.mean([apply_symmetry(torch.from_numpy(p), t, inverse=True).numpy() for t, p in enumerate(plain)], 0)
    got = predict(model, amplitudes, precision="fp32", symmetrize=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - plain[0]).max() > 1e-4  # the untrained network is not symmetric: averaging changes it


def test_pooled_model_takes_the_pooled_amplitudes_and_the_neighbourhood(geometry_small, amplitudes):
    """A pooled model's three channels are the amplitude, the pooled amplitude and the illumination of the
    neighbourhood; it refuses to run without them, and a one-pattern model refuses them."""
    torch.manual_seed(1)
    network = ResUNet(width=0.125, depth=2, in_channels=3).eval()
    model = DeepCDIModel(network, geometry_small, {"name": "pooled", "training_set": {"pool": 3}})
    pooled = amplitudes[::-1].copy()
    offsets = neighbour_offsets(0.25, 30.0)
    out = predict(model, amplitudes, precision="fp32", batch_size=8, pooled=pooled, neighbour_offsets=offsets)
    illumination = pooled_illumination(torch.from_numpy(geometry_small.probe), torch.from_numpy(
        offsets / np.asarray(geometry_small.sampling)).float())
    channels = [torch.from_numpy(amplitudes), torch.from_numpy(pooled), illumination.expand(len(pooled), -1, -1)]
    x = torch.stack(channels, 1)
    with torch.no_grad():
        raw = network(x)[:, 0]
    expected = remove_mask_mean(raw, torch.from_numpy(geometry_small.mask)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5 * np.abs(expected).max())
    chunks = ((amplitudes[s:e], pooled[s:e]) for s, e in ((0, 10), (10, 24)))
    streamed = np.concatenate(list(predict_batches(model, chunks, precision="fp32", neighbour_offsets=offsets)))
    np.testing.assert_allclose(streamed, out, atol=1e-6)
    with pytest.raises(ValueError, match="neighbour_offsets"):
        predict(model, amplitudes, pooled=pooled)
    with pytest.raises(ValueError, match="pooled amplitudes"):
        predict(model, amplitudes, neighbour_offsets=offsets)
    with pytest.raises(ValueError, match="5 patterns"):
        predict(model, amplitudes, pooled=pooled[:5], neighbour_offsets=offsets)
    single = DeepCDIModel(random_network(WIDTH), geometry_small, {"name": "single"})
    with pytest.raises(ValueError, match="one pattern"):
        predict(single, amplitudes, pooled=pooled)
