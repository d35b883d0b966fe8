import pytest
import torch

from py4dstem_deepcdi.network import ResUNet, count_parameters, load_widened


def test_paper_network_size_and_shape():
    net = ResUNet()
    assert count_parameters(net) == pytest.approx(9.4e6, rel=0.01)
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_width_and_depth_options():
    half = ResUNet(width=0.5)
    assert count_parameters(half) == pytest.approx(9.4e6 / 4, rel=0.02)  # conv parameters scale with width²
    shallow = ResUNet(width=0.5, depth=3)
    assert count_parameters(shallow) < count_parameters(half)
    assert shallow(torch.zeros(1, 1, 24, 24)).shape == (1, 1, 24, 24)


def test_dropout_only_in_training():
    net = ResUNet(width=0.25)
    x = torch.randn(2, 1, 32, 32)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


def test_bad_input_shapes():
    net = ResUNet(width=0.25)
    with pytest.raises(ValueError, match=r"\(B, 1, N, N\)"):
        net(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.zeros(1, 1, 30, 30))
    with pytest.raises(ValueError):
        ResUNet(width=0)


def test_probe_conditioned_network_and_widening():
    """A 3-channel network started from a 1-channel one computes exactly what it did, whatever the probe channels."""
    torch.manual_seed(0)
    fixed = ResUNet(width=0.25, depth=2).eval()
    for module in fixed.modules():  # non-trivial normalisation statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    conditioned = ResUNet(width=0.25, depth=2, in_channels=3).eval()
    assert conditioned.config()["in_channels"] == 3
    load_widened(conditioned, fixed.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(conditioned(x), fixed(x[:, :1]))
    with pytest.raises(ValueError, match=r"\(B, 3, N, N\)"):
        conditioned(x[:, :1])
    with pytest.raises(ValueError, match="in_channels"):
        ResUNet(in_channels=2)
    with pytest.raises(ValueError, match="cannot widen"):
        load_widened(ResUNet(width=0.125, depth=2), fixed.state_dict())
