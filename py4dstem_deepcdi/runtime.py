"""The network runtime: an eval-only, BatchNorm-folded copy of the network, its precision, and a cache per model.

What :func:`prepare_network` does to a copy of the network (the caller's network is never touched):

- every residual block's second BatchNorm (``bn2``) is folded into ``conv1`` (for a ``ConvTranspose2d`` along its
  weight's output axis, dim 1 of ``(in, out, kh, kw)``);
- the first BatchNorm (``bn1``) acts on the block input, which the shortcut also reads un-normalised, and is followed
  by a ReLU, so it cannot be folded into any convolution; it becomes a precomputed per-channel float32 affine
  ``x·s + t`` (:class:`ChannelAffine`, one native kernel that keeps the channels-last layout), then an in-place ReLU;
- dropout is removed, the weights are put in channels-last layout (oneDNN's preferred layout on CPU);
- ``precision="bf16"`` converts the weights to bfloat16 and casts the input once at the entry;
- ``compile=True`` wraps it in ``torch.compile``; if compilation fails the eager module is used with a warning.

Speed measurements of these choices: docs/benchmarks.md (``bench/inference.py``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .backend import torch_device

PRECISIONS = ("bf16", "fp32")
_CACHE_ATTRIBUTE = "_deepcdi_prepared_networks"


# ---------------------------------------------------------------------------------------------------- folding
def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(s, t)`` with ``bn(x) == x·s + t`` in eval mode (float64 for an exact fold)."""
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def fold_batchnorm_after(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> nn.Module:
    """A convolution equal to ``bn(conv(x))`` in eval mode (``conv`` is not modified).

    ``Conv2d`` weights are ``(out, in/groups, kh, kw)``; ``ConvTranspose2d`` weights are ``(in, out/groups, kh, kw)``,
    so the per-output-channel scale goes on dim 0 or dim 1 respectively.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    if isinstance(conv, nn.ConvTranspose2d):
        if conv.groups != 1:
            raise NotImplementedError("folding a BatchNorm into a grouped ConvTranspose2d")
        out_axis = 1
    elif isinstance(conv, nn.Conv2d):
        out_axis = 0
    else:
        raise TypeError(f"expected Conv2d or ConvTranspose2d, got {type(conv).__name__}")
    scale, shift = _bn_scale_shift(bn)
    folded = copy.deepcopy(conv)
    weight = conv.weight.detach().double()
    shape = [1] * weight.ndim
    shape[out_axis] = -1
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    folded.weight = nn.Parameter((weight * scale.reshape(shape)).to(conv.weight.dtype), requires_grad=False)
    folded.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)
    return folded


class ChannelAffine(nn.Module):
    """``x·scale + shift`` per channel: an eval-mode BatchNorm with its statistics folded into (scale, shift).

    It runs through ``torch.batch_norm`` with zero mean, unit variance and ``eps=0`` (exactly ``x·scale + shift``):
    that native kernel keeps the channels-last layout and takes a bfloat16 input with float32 parameters.
    ``scale`` and ``shift`` (C,) stay float32 whatever the network's dtype.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.reshape(-1).float().clone())
        self.register_buffer("shift", shift.reshape(-1).float().clone())
        self.register_buffer("zeros", torch.zeros_like(self.scale))
        self.register_buffer("ones", torch.ones_like(self.scale))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> ChannelAffine:
        """The affine equal to ``bn`` in eval mode."""
        return cls(*_bn_scale_shift(bn))

    def _apply(self, fn, recurse=True):
        # keep the affine in float32 when the rest of the network is cast to bfloat16 (device moves still apply)
        dtypes = {name: buf.dtype for name, buf in self._buffers.items()}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, self.scale, self.shift, self.zeros, self.ones, False, 0.0, 0.0, False)


class FoldedBlock(nn.Module):
    """Inference form of a pre-activation residual block: ``conv2(relu(conv1'(relu(a(x))))) + shortcut(x)``.

    ``a`` is ``bn1`` as a per-channel affine and ``conv1'`` is ``conv1`` with ``bn2`` folded in.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.affine = ChannelAffine.from_batchnorm(block.bn1)
        self.conv1 = fold_batchnorm_after(block.conv1, block.bn2)
        self.conv2 = copy.deepcopy(block.conv2)
        self.shortcut = copy.deepcopy(block.shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(F.relu(self.affine(x), inplace=True)), inplace=True)
        out = self.conv2(y)
        return out.add_(self.shortcut(x))  # conv outputs are fresh tensors: add in place, no new allocation


def _is_residual_block(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("bn1", "conv1", "bn2", "conv2", "shortcut")) and isinstance(
        module.bn2, nn.BatchNorm2d
    )


def _fold_in_place(module: nn.Module) -> int:
    """Replace every residual block below ``module`` by a :class:`FoldedBlock` and dropout by identity."""
    count = 0
    for name, child in list(module.named_children()):
        if _is_residual_block(child):
            setattr(module, name, FoldedBlock(child))
            count += 1
        elif isinstance(child, nn.modules.dropout._DropoutNd):
            setattr(module, name, nn.Identity())
        else:
            count += _fold_in_place(child)
    return count


class PreparedNetwork(nn.Module):
    """The inference network: casts the (B, 1, N, N) input once, runs the folded net, returns float32 (rad).

    Attributes: ``net`` (the folded eager module), ``precision`` (``"bf16"`` or ``"fp32"``), ``bf16_mode``
    (``"weights"`` or ``"autocast"``), ``device``, ``compiled`` (a ``torch.compile`` wrapper is in use; set back to
    False if compiling fails at the first call, which then runs eagerly with a warning).
    """

    def __init__(self, net: nn.Module, precision: str, bf16_mode: str, device: torch.device):
        super().__init__()
        self.net = net
        self.precision, self.bf16_mode, self.device = precision, bf16_mode, device
        self.compiled = False
        self._compiled_net: Any = None

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype the input is cast to before the first layer."""
        return torch.bfloat16 if self.precision == "bf16" and self.bf16_mode == "weights" else torch.float32

    def _run(self, net, x: torch.Tensor) -> torch.Tensor:
        autocast = self.precision == "bf16" and self.bf16_mode == "autocast"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            return net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.input_dtype).contiguous(memory_format=torch.channels_last)
        if self.compiled:
            try:
                return self._run(self._compiled_net, x).float()
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                self.compiled, self._compiled_net = False, None
                warnings.warn(
                    f"torch.compile failed ({type(exc).__name__}: {str(exc)[:300]}); using the eager network",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._run(self.net, x).float()


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 runs natively (CPU: oneDNN with AVX512-BF16 or AMX; CUDA: ``is_bf16_supported``)."""
    device = torch_device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())  # pragma: no cover - needs a GPU
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    except Exception:  # noqa: BLE001 - older torch without these queries: trust oneDNN
        return True


def prepare_network(
    network: nn.Module,
    precision: str = "bf16",
    compile: bool = False,  # noqa: A002 - the documented keyword
    device: str | torch.device = "cpu",
    *,
    bf16_mode: str = "weights",
    compile_mode: str | None = "max-autotune-no-cudagraphs",
    compile_options: dict[str, Any] | None = None,
) -> PreparedNetwork:
    """An eval-only copy of ``network`` (a :class:`~py4dstem_deepcdi.network.ResUNet`) optimised for inference.

    Parameters
    ----------
    network
        The trained network; it is deep-copied and never modified (weights, mode and device stay as they are).
    precision
        ``"bf16"`` (bfloat16, default) or ``"fp32"``. Where bfloat16 is not native (CPU without AVX512-BF16/AMX,
        CUDA GPU without bf16) this falls back to ``"fp32"`` with a ``RuntimeWarning``.
    compile
        Wrap the network in ``torch.compile`` (``dynamic=False``). Compilation happens at the first forward of each
        new batch shape (minutes on a small CPU); if it fails, a ``RuntimeWarning`` is issued and the eager network
        is used from then on.
    device
        ``"cpu"`` or ``"gpu"``/``"cuda"``.
    bf16_mode
        ``"weights"`` (default: bfloat16 weights and activations, input cast once; half the weights' memory, no
        per-call weight casts) or ``"autocast"`` (float32 weights under ``torch.autocast``).
    compile_mode, compile_options
        ``mode`` or ``options`` for ``torch.compile`` (``options`` wins when given, e.g. ``{"freezing": True}``).

    Returns
    -------
    PreparedNetwork
        Maps a (B, C, N, N) float input to a (B, 1, N, N) float32 phase (rad); eval mode, no gradients.

    Raises
    ------
    ValueError
        If ``precision`` or ``bf16_mode`` is not one of the values above.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if bf16_mode not in ("weights", "autocast"):
        raise ValueError(f"bf16_mode must be 'weights' or 'autocast', got {bf16_mode!r}")
    dev = torch_device(device)
    if precision == "bf16" and not bf16_supported(dev):
        warnings.warn(
            f"bfloat16 is not native on this {dev.type.upper()} (needs AVX512-BF16/AMX or a bf16 GPU); "
            "using precision='fp32'",
            RuntimeWarning,
            stacklevel=2,
        )
        precision = "fp32"
    net = copy.deepcopy(network).eval()
    if _fold_in_place(net) == 0:
        warnings.warn(
            "prepare_network found no residual blocks to fold; the network runs unfolded", RuntimeWarning, stacklevel=2
        )
    for p in net.parameters():
        p.requires_grad_(False)
    net = net.to(dev, memory_format=torch.channels_last)
    if precision == "bf16" and bf16_mode == "weights":
        net = net.to(torch.bfloat16)
    prepared = PreparedNetwork(net, precision, bf16_mode, dev).eval()
    if compile:
        try:
            if compile_options:
                prepared._compiled_net = torch.compile(net, options=dict(compile_options), dynamic=False)
            else:
                prepared._compiled_net = torch.compile(net, mode=compile_mode, dynamic=False)
            prepared.compiled = True
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {exc}); using the eager network",
                RuntimeWarning,
                stacklevel=2,
            )
    return prepared


# ---------------------------------------------------------------------------------------------------- caching
def weights_fingerprint(network: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (load_state_dict, optimiser step)."""
    return tuple((id(t), t._version) for t in (*network.parameters(), *network.buffers()))


def prepared_network(
    model, precision: str = "bf16", device: str | torch.device = "cpu", compile: bool = False  # noqa: A002
) -> PreparedNetwork:
    """The prepared network of ``model`` (a :class:`~py4dstem_deepcdi.models.DeepCDIModel`) for this precision,
    device and compile flag (see :func:`prepare_network`).

    It is cached on the model, one per (precision, device, compile), and prepared again when the model's weights
    change (a replaced network, ``load_state_dict``, an optimiser step). :func:`clear_cache` frees them.
    """
    device = torch_device(device) if not isinstance(device, torch.device) else device
    cache = model.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
    key = (precision, str(device), bool(compile))
    fingerprint = (id(model.network), weights_fingerprint(model.network))
    entry = cache.get(key)
    if entry is None or entry[0] != fingerprint:
        prepared = prepare_network(model.network, precision, compile=compile, device=device)
        cache[key] = entry = (fingerprint, prepared)
    return entry[1]


def clear_cache(model) -> None:
    """Drop the prepared networks cached on ``model`` (frees their memory)."""
    model.__dict__.pop(_CACHE_ATTRIBUTE, None)
