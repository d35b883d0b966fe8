"""The network runtime: BatchNorm folding, bf16, torch.compile fallback, the prepared-network cache."""

import numpy as np
import pytest
import torch
from networks import random_network
from torch import nn

from py4dstem_deepcdi import runtime
from py4dstem_deepcdi.models import DeepCDIModel
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.runtime import (
    bf16_supported,
    clear_cache,
    fold_batchnorm_after,
    prepare_network,
    prepared_network,
)

WIDTH = 0.25
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def network():
    return random_network(WIDTH)


def _reference(network: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return network(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None])


@pytest.fixture(scope="module")
def amplitudes():
    """Diffraction-like amplitudes (24, 32, 32): non-negative, O(1)."""
    return (1.5 * torch.rand(24, 32, 32, generator=torch.Generator().manual_seed(3)) + 0.3).numpy()


@pytest.mark.parametrize("transpose", [False, True])
def test_fold_batchnorm_after_conv_and_transposed_conv(transpose):
    torch.manual_seed(1)
    conv_type = nn.ConvTranspose2d if transpose else nn.Conv2d
    extra = {"output_padding": 1} if transpose else {}
    conv = conv_type(3, 5, 3, stride=2, padding=1, **extra)  # in != out: a wrong weight axis cannot pass
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    bn.eval()
    folded = fold_batchnorm_after(conv, bn)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = bn(conv(x))
        got = folded(x)
    assert folded is not conv and folded.weight is not conv.weight
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_folded_fp32_equals_eval_network(network, amplitudes):
    before = {k: v.clone() for k, v in network.state_dict().items()}
    training, grads = network.training, [p.requires_grad for p in network.parameters()]
    prepared = prepare_network(network, precision="fp32")
    expected = _reference(network, amplitudes)
    with torch.inference_mode():
        got = prepared(torch.from_numpy(amplitudes)[:, None])
    rel = float((got - expected).abs().max() / expected.abs().max())
    print(f"folded fp32 vs eval network: max |diff| / max |out| = {rel:.2e}")
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert rel < 1e-5
    # the caller's network is untouched: weights, statistics, mode, grad flags, module types
    after = network.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert network.training == training and [p.requires_grad for p in network.parameters()] == grads
    assert type(network.stem).__name__ == "ResidualBlock" and isinstance(network.drop, nn.Dropout)
    # nothing is left to fold or drop out in the prepared copy
    kinds = {type(m) for m in prepared.modules()}
    assert nn.BatchNorm2d not in kinds and nn.Dropout not in kinds
    assert not prepared.training and not any(p.requires_grad for p in prepared.parameters())


def test_prepare_does_not_touch_a_training_mode_network():
    torch.manual_seed(2)
    net = ResUNet(width=WIDTH).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prepare_network(net, precision="fp32")
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.skipif(not bf16_supported("cpu"), reason="no native bf16 on this CPU")
@pytest.mark.parametrize("mode", ["weights", "autocast"])
def test_bf16_close_to_fp32(network, amplitudes, mode):
    fp32 = prepare_network(network, precision="fp32")
    bf16 = prepare_network(network, precision="bf16", bf16_mode=mode)
    x = torch.from_numpy(amplitudes)[:, None]
    with torch.inference_mode():
        a, b = fp32(x), bf16(x)
    scale = float(a.abs().max())
    rel_max = float((a - b).abs().max()) / scale
    rel_mean = float((a - b).abs().mean()) / scale
    print(f"bf16 ({mode}) vs fp32: max {rel_max:.2e}, mean {rel_mean:.2e} of max |output| {scale:.3f}")
    assert b.dtype == torch.float32
    assert 0 < rel_max < 0.05  # it does run in bf16 (not identical), and stays close (8-bit mantissa)
    assert rel_mean < 0.01


def test_bf16_falls_back_with_warning(network, monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device="cpu": False)
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        prepared = prepare_network(network, precision="bf16")
    assert prepared.precision == "fp32" and next(prepared.parameters()).dtype == torch.float32


def test_compile_failure_falls_back_to_eager(network, amplitudes, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        prepared = prepare_network(network, precision="fp32", compile=True)
    assert not prepared.compiled
    with torch.inference_mode():
        got = prepared(torch.from_numpy(amplitudes[:4])[:, None])
    assert torch.allclose(got, _reference(network, amplitudes[:4]), rtol=1e-5, atol=1e-5)


def test_bad_precision_is_rejected(network):
    with pytest.raises(ValueError, match="precision"):
        prepare_network(network, precision="fp16")


def test_prepared_network_accessor_caches_per_setting(network):
    model = DeepCDIModel(network, ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}), {})
    first = prepared_network(model, "fp32", "cpu")
    assert prepared_network(model, "fp32", torch.device("cpu")) is first  # a device name or a torch.device
    assert prepared_network(model, "fp32", "cpu", compile=False) is first
    assert first.precision == "fp32" and not first.compiled
    clear_cache(model)
    assert prepared_network(model, "fp32", "cpu") is not first
    clear_cache(model)
    clear_cache(model)  # clearing an empty cache is fine
