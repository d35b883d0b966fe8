"""Helpers of the network tests (tests/test_inference.py, tests/test_runtime.py)."""

import torch
from torch import nn

from py4dstem_deepcdi.network import ResUNet


def randomise_batchnorms(network: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN: random affine parameters, then running statistics from a few training-mode forwards."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
                module.momentum = 0.5
        network.train()
        for _ in range(4):
            network(1.5 * torch.rand(16, 1, 32, 32, generator=generator) + 0.3)
    network.eval()


def random_network(width: float = 0.25) -> ResUNet:
    """A ResUNet of this width with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    network = ResUNet(width=width)
    randomise_batchnorms(network)
    return network
