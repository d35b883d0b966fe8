import pytest
import torch

from py4dstem_deepcdi.network import ResUNet, count_parameters


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
