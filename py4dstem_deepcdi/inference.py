"""Batched, memory-bounded prediction of phase patches by the network, optionally averaged over probe symmetries.

Units: the network input is the normalised diffraction amplitude of :func:`~py4dstem_deepcdi.encoding.network_input`
(``sqrt(counts / electrons × N_pixels)``, dimensionless, ≥ 0); the output is the object phase of each patch (rad),
zero outside the model's illuminated mask and with zero mean inside it (the zero frequency is unrecoverable and is
set by stitching). The network runs as prepared by :mod:`~py4dstem_deepcdi.runtime` (BatchNorm folded, bf16 where
native) or, with ``runtime="onnxruntime"``/``"openvino"``, in an optional runtime (:mod:`~py4dstem_deepcdi.runtimes`),
cached on the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .backend import torch_device
from .encoding import pooled_illumination, probe_channels, remove_mask_mean
from .runtimes import CALIBRATION_SAMPLES, inference_network
from .stream import StreamConfig, TrainingStream

#: the stream worker whose samples calibrate int8 graphs (the training stream's workers count up from 0)
CALIBRATION_WORKER = 1_000_003


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
            f"{where} must have shape {expected} (the model's detector shape is {shape}), "
            f"got {tuple(chunk.shape)}{hint}"
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
        raise ValueError(
            f"{where} contains negative amplitudes (first in pattern {bad}); amplitudes are sqrt(counts) ≥ 0"
        )


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


def calibration_inputs(model, samples: int = CALIBRATION_SAMPLES, seed: int = 0) -> np.ndarray:
    """(samples, C, N, N) float32 network inputs from the model's training stream, to calibrate an int8 graph.

    The stream is :class:`~py4dstem_deepcdi.stream.TrainingStream` on the model's geometry with the settings it was
    trained with (``model.metadata["training_set"]``: dose, phase and probe ranges, pooling; the default photographs
    instead of a user's image folder), seeded by ``seed`` on its own worker, so the inputs are reproducible.

    Raises
    ------
    ValueError
        If ``samples`` < 1, or the stream's input channels differ from the network's.
    """
    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    names = {f.name for f in dataclasses.fields(StreamConfig)}
    trained = {k: v for k, v in model.metadata.get("training_set", {}).items() if k in names}
    trained.update(batch_size=int(samples), image_folder=None)
    if model.geometry.vacuum_probe_intensity is not None:
        trained["edge_width_range"] = None
    stream = TrainingStream(model.geometry, StreamConfig(**trained), seed=seed, worker=CALIBRATION_WORKER)
    channels = int(getattr(model.network, "in_channels", 1))
    if stream.in_channels != channels:
        raise ValueError(
            f"the model's training stream has {stream.in_channels} input channels, its network {channels}; "
            "its metadata lacks the training set's aberration_ranges or pool"
        )
    return stream.batch(0)[0].cpu().numpy()


def _as_batch(part: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """One batch of a chunk as a float32 tensor on ``device``."""
    if isinstance(part, np.ndarray):
        part = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
    return part.detach().to(device=device, dtype=torch.float32)


class _Runner:
    """Everything one prediction call needs: the network (of its runtime), the mask, the batch size and the progress
    bar."""

    def __init__(self, model, batch_size: int, precision: str, device: str, compile: bool, progress: bool, total,  # noqa: A002
                 geometry=None, symmetrize: bool = False, neighbour_offsets=None, runtime: str = "torch"):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch_device(device)
        self.shape = tuple(int(n) for n in model.geometry.detector_shape)
        self.net = inference_network(model, runtime, precision, self.device, compile,
                                     calibration=lambda: calibration_inputs(model))
        self.condition = None
        if model.conditioned:  # the probe is an input: its channels, and its own mask
            geometry = geometry if geometry is not None else model.geometry
            self.condition = probe_channels(geometry.probe).to(self.device)
        else:
            geometry = model.geometry
        self.illumination = None
        if model.pool > 1:  # a pooled network: the illumination of the neighbourhood is its third channel
            if neighbour_offsets is None:
                raise ValueError(
                    "a pooled model needs the scan's neighbour_offsets (9, 2) Å (scan.neighbour_offsets(step, "
                    "rotation, transpose)) and the pooled amplitudes"
                )
            offsets = np.asarray(neighbour_offsets, dtype=np.float64)
            if offsets.shape != (9, 2):
                raise ValueError(f"neighbour_offsets must have shape (9, 2) (Å), got {offsets.shape}")
            offsets_px = torch.as_tensor(offsets / np.asarray(geometry.sampling), dtype=torch.float32)
            self.illumination = pooled_illumination(torch.as_tensor(geometry.probe), offsets_px).to(self.device)
        self.symmetries = probe_symmetries(geometry.probe) if symmetrize else [0]
        mask = torch.as_tensor(np.asarray(geometry.mask, dtype=np.float32), device=self.device)
        if tuple(mask.shape) != self.shape:
            raise ValueError(f"the probe's mask has shape {tuple(mask.shape)}, expected {self.shape}")
        if mask.sum() == 0:
            raise ValueError("the illuminated mask is empty; lower mask_threshold")
        self.mask = mask
        self.bar = None
        if progress:
            self.bar = tqdm(total=total, desc="deepcdi", unit="pattern")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def run(
        self, chunk: Any, out: np.ndarray | None = None, where: str = "amplitudes", pooled: Any = None
    ) -> np.ndarray:
        """Predict one (J, N, N) chunk (with its (J, N, N) ``pooled`` amplitudes for a pooled model) batch by batch
        into ``out`` (allocated when None); returns ``out``."""
        chunk = _check_chunk(chunk, self.shape, where)
        n = chunk.shape[0]
        if (self.illumination is None) != (pooled is None):
            raise ValueError(
                "a pooled model needs the pooled amplitudes (preprocess(..., pool=3))"
                if pooled is None else "pooled amplitudes are for a pooled model; this model sees one pattern"
            )
        if pooled is not None:
            pooled = _check_chunk(pooled, self.shape, f"pooled {where}")
            if pooled.shape[0] != n:
                raise ValueError(f"pooled {where} has {pooled.shape[0]} patterns, {where} has {n}")
        if out is None:
            out = np.empty((n, *self.shape), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            batch = _as_batch(chunk[start:stop], self.device)
            _check_values(batch, start, where)
            channels = [batch]
            if pooled is not None:
                channels.append(_as_batch(pooled[start:stop], self.device))
                _check_values(channels[1], start, f"pooled {where}")
                channels.append(self.illumination.expand(len(batch), -1, -1))
            with torch.inference_mode():
                batch = torch.stack(channels, 1)
                if self.net.compiled and len(batch) < self.batch_size:
                    # one compiled graph per batch size: pad a short batch instead of recompiling (minutes)
                    batch = torch.cat([batch, batch.new_zeros((self.batch_size - len(batch), *batch.shape[1:]))])
                phase = 0
                for t in self.symmetries:  # the probe is invariant under t: predict the turned pattern, turn back
                    inputs = apply_symmetry(batch, t)
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
    pooled: np.ndarray | torch.Tensor | None = None,
    neighbour_offsets: np.ndarray | None = None,
    runtime: str = "torch",
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
        Network arithmetic, one of ``runtimes.RUNTIME_PRECISIONS[runtime]``: torch ``"bf16"`` (default; falls back to
        ``"fp32"`` with a warning where not native) or ``"fp32"``; onnxruntime ``"fp32"`` or ``"int8"``; openvino
        ``"fp32"``, ``"bf16"`` or ``"int8"``. ``"int8"`` graphs are calibrated on :func:`calibration_inputs`.
    device
        ``"cpu"`` or ``"gpu"`` (the optional runtimes: ``"cpu"`` only).
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
        back. Costs one network pass per symmetry; lowers the network's error (docs/benchmarks.md).
    pooled, neighbour_offsets
        For a pooled model (``model.pool == 3``), required: the (J, N, N) normalised amplitudes of each position's
        summed 3×3 neighbourhood (:attr:`~py4dstem_deepcdi.preprocessing.PreprocessedData.pooled`) and the (9, 2)
        offsets (Å) of that neighbourhood (:func:`~py4dstem_deepcdi.scan.neighbour_offsets`).
    runtime
        ``"torch"`` (default), or the optional CPU runtimes ``"onnxruntime"`` or ``"openvino"``
        (:mod:`~py4dstem_deepcdi.runtimes`; their exported graph is cached on the model). A missing optional runtime
        falls back to torch (``"int8"`` as ``"fp32"``) with a ``RuntimeWarning`` naming the pip extra to install.

    Returns
    -------
    numpy.ndarray
        (J, N, N) float32 phase (rad), 0 outside the illuminated mask and zero-mean inside it.

    Raises
    ------
    ValueError
        For amplitudes of the wrong shape, type or values, pooled inputs missing for a pooled model (or given to
        another), an unknown runtime, a precision the runtime does not offer, or an optional runtime with
        ``device="gpu"`` or ``compile=True``.
    """
    amplitudes = _check_chunk(amplitudes, tuple(model.geometry.detector_shape), "amplitudes")
    runner = _Runner(model, batch_size, precision, device, compile, progress, total=int(amplitudes.shape[0]),
                     geometry=geometry, symmetrize=symmetrize, neighbour_offsets=neighbour_offsets, runtime=runtime)
    try:
        return runner.run(amplitudes, pooled=pooled)
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
    neighbour_offsets: np.ndarray | None = None,
    runtime: str = "torch",
) -> Iterator[np.ndarray]:
    """Stream :func:`predict` over chunks of a datacube too large for memory: yields one (J_i, N, N) array per chunk.

    Each chunk (e.g. a few scan rows of a datacube, reshaped to (J_i, N, N)) is split into ``batch_size`` batches;
    only one chunk's input and output are held at a time. ``total`` (patterns) sizes the progress bar. For a pooled
    model each chunk is a pair ``(amplitudes, pooled)``. Other parameters and the returned values are those of
    :func:`predict`.
    """
    runner = _Runner(model, batch_size, precision, device, compile, progress, total=total, geometry=geometry,
                     symmetrize=symmetrize, neighbour_offsets=neighbour_offsets, runtime=runtime)
    try:
        for index, chunk in enumerate(chunks):
            pooled = None
            if isinstance(chunk, tuple):
                chunk, pooled = chunk
            yield runner.run(chunk, where=f"chunk {index}", pooled=pooled)
    finally:
        runner.close()

