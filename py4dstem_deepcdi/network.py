"""The residual U-Net of the method (Chang et al. 2023), with width and depth options.

Residual block: BN → ReLU → conv3×3 → BN → ReLU → conv3×3, plus a conv3×3 shortcut, summed. Encoder: a residual
block (16 channels) then stride-2 down blocks (32, 64, 128, 256), each followed by a residual block; decoder:
stride-2 transposed-convolution up blocks mirroring it with concatenation skips; two final residual blocks
(32 then 1 channel); dropout 0.2 after every stage. ``width=1, depth=4`` is the paper's network (9.4 M parameters).
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """Pre-activation residual block; ``stride=2`` halves (``up=True``: doubles) the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, up: bool = False):
        super().__init__()
        if up:
            first = nn.ConvTranspose2d(in_channels, out_channels, 3, stride, padding=1, output_padding=stride - 1)
            shortcut = nn.ConvTranspose2d(in_channels, out_channels, 3, stride, padding=1, output_padding=stride - 1)
        else:
            first = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1)
            shortcut = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = first
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = shortcut
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.relu(self.bn1(x)))
        y = self.conv2(self.relu(self.bn2(y)))
        return y + self.shortcut(x)


class Stage(nn.Sequential):
    """A stride-2 down (or up) residual block followed by a plain residual block."""

    def __init__(self, in_channels: int, out_channels: int, up: bool = False):
        super().__init__(ResidualBlock(in_channels, out_channels, 2, up=up), ResidualBlock(out_channels, out_channels))


class ResUNet(nn.Module):
    """Residual U-Net mapping a (B, C, N, N) input to a (B, 1, N, N) phase patch (rad).

    The input is the diffraction amplitude (C = 1) or, for a probe-conditioned network, the amplitude and the
    candidate probe's real and imaginary parts (C = 3, see :func:`~py4dstem_deepcdi.encoding.probe_channels`), or for
    a pooled network the amplitude, the pooled amplitude and the pooled illumination (C = 3, see
    :mod:`~py4dstem_deepcdi.encoding`).

    Parameters
    ----------
    width
        Channel multiplier (1.0 = the paper's 16-32-64-128-256).
    depth
        Number of stride-2 levels (4 = the paper's); N must be divisible by 2**depth.
    dropout
        Dropout rate after every stage (the paper's 0.2).
    in_channels
        Input channels: 1 (the paper's network) or 3 (probe-conditioned or pooled).
    """

    def __init__(self, width: float = 1.0, depth: int = 4, dropout: float = 0.2, in_channels: int = 1):
        super().__init__()
        if width <= 0 or depth < 1:
            raise ValueError(f"width must be > 0 and depth >= 1, got width={width}, depth={depth}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (amplitude) or 3 (amplitude + probe), got {in_channels}")
        self.width, self.depth, self.dropout_rate = float(width), int(depth), float(dropout)
        self.in_channels = int(in_channels)
        channels = [max(1, round(16 * width * 2**i)) for i in range(depth + 1)]
        self.stem = ResidualBlock(in_channels, channels[0])
        self.down = nn.ModuleList(Stage(channels[i], channels[i + 1]) for i in range(depth))
        ups, skips_in = [], channels[depth]
        for i in reversed(range(depth)):
            out = channels[i + 1] if i == depth - 1 else channels[i + 1]
            ups.append(Stage(skips_in, out, up=True))
            skips_in = out + channels[i]
        self.up = nn.ModuleList(ups)
        self.head = nn.Sequential(ResidualBlock(skips_in, channels[1]), ResidualBlock(channels[1], 1))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResUNet expects input of shape (B, {self.in_channels}, N, N), got {tuple(x.shape)}")
        if x.shape[-1] % 2**self.depth or x.shape[-2] % 2**self.depth:
            raise ValueError(f"pattern size {tuple(x.shape[-2:])} must be divisible by 2**depth = {2**self.depth}")
        skips = [self.drop(self.stem(x))]
        y = skips[0]
        for stage in self.down:
            y = self.drop(stage(y))
            skips.append(y)
        skips.pop()  # the bottleneck is not a skip
        for stage in self.up:
            y = torch.cat([self.drop(stage(y)), skips.pop()], 1)
        return self.head(y)

    def config(self) -> dict:
        """Constructor arguments, for model files."""
        return {"width": self.width, "depth": self.depth, "dropout": self.dropout_rate, "in_channels": self.in_channels}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_widened(network: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``network`` where some tensors of ``network`` have more input channels.

    Used to start a probe-conditioned network (3 input channels) from a fixed-probe one (1): each tensor is copied
    into the leading part of the larger one; the extra input weights of convolutions are set to zero (the network
    then computes exactly what the fixed-probe one did), extra normalisation entries keep their initial values.
    """
    own = network.state_dict()
    unknown = set(state_dict) - set(own)
    if unknown:
        raise ValueError(f"the weights do not belong to this network (unknown tensors {sorted(unknown)[:3]})")
    with torch.no_grad():
        for name, target in own.items():
            source = state_dict[name].to(target.dtype)
            if source.shape == target.shape:
                target.copy_(source)
                continue
            if source.ndim != target.ndim or any(a > b for a, b in zip(source.shape, target.shape)):
                raise ValueError(f"cannot widen {name}: {tuple(source.shape)} into {tuple(target.shape)}")
            if target.ndim == 4:
                target.zero_()
            target[tuple(slice(0, n) for n in source.shape)] = source
