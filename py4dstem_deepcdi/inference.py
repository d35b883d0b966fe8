"""Fast inference: a folded, eval-only copy of the network and batched, memory-bounded prediction.

Units: the network input is the normalised diffraction amplitude of :func:`~py4dstem_deepcdi.encoding.network_input`
(``sqrt(counts / electrons × N_pixels)``, dimensionless, ≥ 0); the output is the object phase of each patch (rad),
zero outside the model's illuminated mask and with zero mean inside it (the zero frequency is unrecoverable and is
set by stitching).

What :func:`prepare_network` does to a copy of the network (the caller's network is never touched):

- every residual block's second BatchNorm (``bn2``) is folded into ``conv1`` (for a ``ConvTranspose2d`` along its
  weight's output axis, dim 1 of ``(in, out, kh, kw)``);
- the first BatchNorm (``bn1``) acts on the block input, which the shortcut also reads un-normalised, and is followed
  by a ReLU, so it cannot be folded into any convolution (folding it into the next conv would need the ReLU to
  commute with it); it becomes a precomputed per-channel float32 affine ``x·s + t`` (:class:`ChannelAffine`, one
  native kernel that keeps the channels-last layout), then an in-place ReLU;
- dropout is removed, the weights are put in channels-last layout (oneDNN's preferred layout on CPU);
- ``precision="bf16"`` converts the weights to bfloat16 and casts the input once at the entry. On this project's
  2-core AVX512-BF16 CPU (no AMX) it ran at the speed of ``torch.autocast`` within the noise of a loaded machine
  (``bench/inference.py`` times both); it is kept because it halves the weights' memory and skips the per-call weight
  casts. Folding + channels-last gave 1.5-2.2x over the eager fp32 network, bf16 another 1.4-2.3x;
- ``compile=True`` wraps it in ``torch.compile`` (measured -12 % to +30 %, i.e. no reliable gain on that CPU, since
  the oneDNN convolutions are ~90 % of the time); if compilation fails the eager module is used with a warning.
  Prediction pads a short last batch to the full batch size when compiled, so one graph serves every batch.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .backend import torch_device
from .encoding import probe_channels, remove_mask_mean

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
    that native kernel keeps the channels-last layout and takes a bfloat16 input with float32 parameters, whereas
    ``addcmul``/broadcast arithmetic on a (1, C, 1, 1) operand was measured 5-7× slower in bfloat16 and returned a
    contiguous tensor, which made every following convolution reorder its input. ``scale`` and ``shift`` stay float32
    whatever the network's dtype.
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
        new batch shape (minutes on a 2-core CPU); if it fails, a ``RuntimeWarning`` is issued and the eager network
        is used from then on.
    device
        ``"cpu"`` or ``"gpu"``/``"cuda"``.
    bf16_mode
        ``"weights"`` (default: bfloat16 weights and activations, input cast once) or ``"autocast"`` (float32
        weights under ``torch.autocast``). Both gave the same speed within noise on this project's 2-core
        AVX512-BF16 CPU (``bench/inference.py`` times both); weights halve the memory and skip per-call casts.
    compile_mode, compile_options
        ``mode`` or ``options`` for ``torch.compile`` (``options`` wins when given, e.g. ``{"freezing": True}``).

    Returns
    -------
    PreparedNetwork
        Maps a (B, 1, N, N) float amplitude to a (B, 1, N, N) float32 phase (rad); eval mode, no gradients.
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
        warnings.warn("prepare_network found no residual blocks to fold; the network runs unfolded", RuntimeWarning, stacklevel=2)
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
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); using the eager network", RuntimeWarning, stacklevel=2)
    return prepared


# ---------------------------------------------------------------------------------------------------- caching
def _weights_fingerprint(network: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (load_state_dict, optimiser step)."""
    return tuple((id(t), t._version) for t in (*network.parameters(), *network.buffers()))


def _prepared_for(model, precision: str, device: torch.device, compile: bool) -> PreparedNetwork:  # noqa: A002
    """The prepared network cached on ``model`` for this (precision, device, compile), refolded if weights changed."""
    cache = model.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
    key = (precision, str(device), bool(compile))
    fingerprint = (id(model.network), _weights_fingerprint(model.network))
    entry = cache.get(key)
    if entry is None or entry[0] != fingerprint:
        prepared = prepare_network(model.network, precision, compile=compile, device=device)
        cache[key] = entry = (fingerprint, prepared)
    return entry[1]


def clear_cache(model) -> None:
    """Drop the prepared networks cached on ``model`` (frees their memory)."""
    model.__dict__.pop(_CACHE_ATTRIBUTE, None)


# ---------------------------------------------------------------------------------------------------- prediction
def _check_chunk(chunk: Any, shape: tuple[int, int], where: str) -> np.ndarray | torch.Tensor:
    """Validate one (J, N, N) block of amplitudes without copying it."""
    if not isinstance(chunk, (np.ndarray, torch.Tensor)):
        chunk = np.asarray(chunk)
    expected = f"(J, {shape[0]}, {shape[1]})"
    if chunk.ndim != 3 or tuple(chunk.shape[1:]) != tuple(shape):
        hint = ""
        if chunk.ndim == 4 and tuple(chunk.shape[2:]) == tuple(shape):
            hint = "; reshape a (Rx, Ry, N, N) datacube to (Rx·Ry, N, N)"
        elif chunk.ndim == 2 and tuple(chunk.shape) == tuple(shape):
            hint = "; add a leading axis for a single pattern"
        raise ValueError(
            f"{where} must have shape {expected} (the model's detector shape is {shape}), got {tuple(chunk.shape)}{hint}"
        )
    floating = chunk.is_floating_point() if isinstance(chunk, torch.Tensor) else np.issubdtype(chunk.dtype, np.floating)
    if not floating:
        raise ValueError(
            f"{where} must be floating point (normalised amplitudes from network_input), got dtype {chunk.dtype}"
        )
    return chunk


def _check_values(batch: torch.Tensor, start: int, where: str) -> None:
    finite = torch.isfinite(batch)
    if not bool(finite.all()):
        bad = start + int((~finite).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(f"{where} contains NaN or inf values (first in pattern {bad})")
    if bool((batch < 0).any()):
        bad = start + int((batch < 0).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(f"{where} contains negative amplitudes (first in pattern {bad}); amplitudes are sqrt(counts) ≥ 0")


# ---------------------------------------------------------------------------------------------------- symmetries
def _reflect(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Reflection about the centre pixel N//2 (where the DC term and the probe centre sit): index i -> N - i mod N."""
    return torch.roll(torch.flip(x, (dim,)), 1, dim)


def apply_symmetry(x: torch.Tensor, t: int, inverse: bool = False) -> torch.Tensor:
    """One of the 8 symmetries of the square on the last two axes, about pixel (N//2, N//2): ``t`` bit 4 transposes,
    bit 1 reflects axis -2, bit 2 reflects axis -1 (transpose first; ``inverse`` undoes it)."""
    steps = [("T", t & 4), ("0", t & 1), ("1", t & 2)]
    for kind, on in reversed(steps) if inverse else steps:
        if on:
            x = x.transpose(-1, -2) if kind == "T" else _reflect(x, -2 if kind == "0" else -1)
    return x


def probe_symmetries(probe: np.ndarray, tolerance: float = 1e-6) -> list[int]:
    """The symmetries of the square (see :func:`apply_symmetry`) that leave the complex probe unchanged.

    A probe with only defocus (and a round aperture) has all 8; twofold astigmatism keeps 4 or fewer, coma or
    threefold astigmatism fewer still. Under such a symmetry the forward model commutes with the transform, so the
    network may be applied to the transformed pattern and its patch transformed back.
    """
    p = torch.as_tensor(np.asarray(probe))
    scale = float(p.abs().max())
    square = p.shape[-1] == p.shape[-2]
    return [
        t for t in range(8)
        if (square or not t & 4) and float((apply_symmetry(p, t) - p).abs().max()) <= tolerance * scale
    ]


class _Runner:
    """Everything one prediction call needs: the prepared net, the mask, the batch size and the progress bar."""

    def __init__(self, model, batch_size: int, precision: str, device: str, compile: bool, progress: bool, total,  # noqa: A002
                 geometry=None, symmetrize: bool = False):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch_device(device)
        self.shape = tuple(int(n) for n in model.geometry.detector_shape)
        self.net = _prepared_for(model, precision, self.device, compile)
        self.condition = None
        if model.conditioned:  # the probe is an input: its channels, and its own mask
            geometry = geometry if geometry is not None else model.geometry
            self.condition = probe_channels(geometry.probe).to(self.device)
        else:
            geometry = model.geometry
        self.symmetries = probe_symmetries(geometry.probe) if symmetrize else [0]
        mask = torch.as_tensor(np.asarray(geometry.mask, dtype=np.float32), device=self.device)
        if tuple(mask.shape) != self.shape:
            raise ValueError(f"the probe's mask has shape {tuple(mask.shape)}, expected {self.shape}")
        if mask.sum() == 0:
            raise ValueError("the illuminated mask is empty; lower mask_threshold")
        self.mask = mask
        self.bar = None
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, desc="deepcdi", unit="pattern")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def run(self, chunk: Any, out: np.ndarray | None = None, where: str = "amplitudes") -> np.ndarray:
        """Predict one (J, N, N) chunk batch by batch into ``out`` (allocated when None); returns ``out``."""
        chunk = _check_chunk(chunk, self.shape, where)
        n = chunk.shape[0]
        if out is None:
            out = np.empty((n, *self.shape), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            part = chunk[start:stop]
            if isinstance(part, np.ndarray):
                part = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
            else:
                part = part.detach()
            batch = part.to(device=self.device, dtype=torch.float32)
            _check_values(batch, start, where)
            with torch.inference_mode():
                if self.net.compiled and len(batch) < self.batch_size:
                    # one compiled graph per batch size: pad a short batch instead of recompiling (minutes)
                    batch = torch.cat([batch, batch.new_zeros((self.batch_size - len(batch), *self.shape))])
                phase = 0
                for t in self.symmetries:  # the probe is invariant under t: predict the turned pattern, turn back
                    inputs = apply_symmetry(batch, t)[:, None]
                    if self.condition is not None:
                        inputs = torch.cat([inputs, self.condition.expand(len(batch), -1, -1, -1)], 1)
                    phase = phase + apply_symmetry(self.net(inputs)[: stop - start, 0], t, inverse=True)
                phase = phase / len(self.symmetries)
                phase = remove_mask_mean(phase, self.mask)
            out[start:stop] = phase.cpu().numpy()
            if self.bar is not None:
                self.bar.update(stop - start)
        return out


def predict(
    model,
    amplitudes: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 1024,
    precision: str = "bf16",
    device: str = "cpu",
    compile: bool = False,  # noqa: A002
    progress: bool = False,
    geometry=None,
    symmetrize: bool = False,
) -> np.ndarray:
    """Phase patches (rad) retrieved by the network from diffraction amplitudes.

    Parameters
    ----------
    model
        A :class:`~py4dstem_deepcdi.models.DeepCDIModel`; its prepared network is cached on it per
        (precision, device, compile) and refolded automatically when its weights change.
    amplitudes
        (J, N, N) floating-point network input (numpy or torch): normalised amplitudes
        ``sqrt(counts / electrons × N_pixels)`` from :func:`~py4dstem_deepcdi.encoding.network_input`, ≥ 0 and
        finite, (N, N) = ``model.geometry.detector_shape``.
    batch_size
        Patterns per forward pass; bounds the memory (activations ≈ 0.5 MB per pattern for the paper network).
    precision
        ``"bf16"`` (default; falls back to ``"fp32"`` with a warning where not native) or ``"fp32"``.
    device
        ``"cpu"`` or ``"gpu"``.
    compile
        Use ``torch.compile`` (the first call compiles, minutes on a small CPU; a short last batch is padded to
        ``batch_size`` so that one graph serves all batches). Falls back to eager with a warning if it fails.
    progress
        Show a tqdm progress bar.
    geometry
        For a probe-conditioned model: the :class:`~py4dstem_deepcdi.probe.ProbeGeometry` of the data, whose probe is
        fed to the network and whose mask bounds the patches (default the model's reference probe). Ignored by a
        fixed-probe model.
    symmetrize
        Average the network's patches over the symmetries of the square that leave the probe unchanged
        (:func:`probe_symmetries`; all 8 for a defocused round probe): each pattern is turned, predicted and turned
        back. Costs one network pass per symmetry; lowers the network's error (bench/quality.py: smooth random
        objects +0.015 correlation with the truth).

    Returns
    -------
    numpy.ndarray
        (J, N, N) float32 phase (rad), 0 outside the illuminated mask and zero-mean inside it.
    """
    amplitudes = _check_chunk(amplitudes, tuple(model.geometry.detector_shape), "amplitudes")
    runner = _Runner(model, batch_size, precision, device, compile, progress, total=int(amplitudes.shape[0]),
                     geometry=geometry, symmetrize=symmetrize)
    try:
        return runner.run(amplitudes)
    finally:
        runner.close()


def predict_batches(
    model,
    chunks: Iterable[np.ndarray | torch.Tensor],
    *,
    batch_size: int = 1024,
    precision: str = "bf16",
    device: str = "cpu",
    compile: bool = False,  # noqa: A002
    progress: bool = False,
    total: int | None = None,
    geometry=None,
    symmetrize: bool = False,
) -> Iterator[np.ndarray]:
    """Stream :func:`predict` over chunks of a datacube too large for memory: yields one (J_i, N, N) array per chunk.

    Each chunk (e.g. a few scan rows of a datacube, reshaped to (J_i, N, N)) is split into ``batch_size`` batches;
    only one chunk's input and output are held at a time. ``total`` (patterns) sizes the progress bar. Other
    parameters and the returned values are those of :func:`predict`.
    """
    runner = _Runner(model, batch_size, precision, device, compile, progress, total=total, geometry=geometry,
                     symmetrize=symmetrize)
    try:
        for index, chunk in enumerate(chunks):
            yield runner.run(chunk, where=f"chunk {index}")
    finally:
        runner.close()

