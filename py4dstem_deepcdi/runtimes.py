"""Optional inference runtimes beside PyTorch on the CPU: ONNX Runtime and OpenVINO, one exported graph for both.

- The graph is exported once per model (``torch.onnx.export``, the torch.export-based exporter) from the
  BatchNorm-folded float32 network of :func:`~py4dstem_deepcdi.runtime.prepare_network`, with a dynamic batch axis:
  input ``amplitudes`` (B, C, N, N) float32 (C = the network's 1 or 3 input channels), output ``phase`` (B, 1, N, N).
- ``precision="int8"``: static quantisation by ONNX Runtime's quantiser (QDQ format, int8 weights per output channel,
  uint8 activations with min/max ranges from calibration inputs: the model's training stream, see
  :func:`~py4dstem_deepcdi.inference.calibration_inputs`). The first residual block (it reads the raw amplitudes,
  whose dark field is orders of magnitude below the bright field) and the head (the two residual blocks after the
  last skip concatenation, which write the phase) stay float32. Both runtimes run that same quantised graph.
- OpenVINO's ``precision="bf16"`` is its ``INFERENCE_PRECISION_HINT``; where bfloat16 is not native it falls back
  to float32 with a ``RuntimeWarning``, as the torch runtime does. ``"fp32"`` pins the hint to float32 (OpenVINO
  otherwise picks bfloat16 by itself on CPUs that have it).
- Each runtime uses ``torch.get_num_threads()`` threads at the time its session is made.
- Missing packages: the runtime falls back to torch with a ``RuntimeWarning`` that names the pip extra to install
  (``int8`` then runs as torch ``fp32``); bad runtime or precision names raise ``ValueError``.

Graphs and sessions are cached on the model (like :func:`~py4dstem_deepcdi.runtime.prepared_network`) and made
again when its weights change. Speed and quality of each runtime: docs/benchmarks.md (``bench/runtimes.py``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backend import torch_device
from .runtime import PreparedNetwork, prepare_network, prepared_network, weights_fingerprint

RUNTIMES = ("torch", "onnxruntime", "openvino")
#: the precisions each runtime offers
RUNTIME_PRECISIONS = {"torch": ("bf16", "fp32"), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
#: each runtime's default precision (the command line's, when --precision is not given)
DEFAULT_PRECISIONS = {"torch": "bf16", "onnxruntime": "fp32", "openvino": "bf16"}
#: the pip extra (``pip install "py4dstem-deepcdi[EXTRA]"``) that brings each optional runtime
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
#: calibration inputs of the int8 quantisation (min/max ranges: more samples catch rarer outliers, widening them)
CALIBRATION_SAMPLES = 256
INPUT_NAME, OUTPUT_NAME = "amplitudes", "phase"
_CACHE_ATTRIBUTE = "_deepcdi_runtime_networks"
_EXPORT_MODULES = ("onnx", "onnxscript")


# ---------------------------------------------------------------------------------------------------- names
def check_runtime(runtime: str, precision: str) -> None:
    """Raise ``ValueError`` (naming the valid values) unless ``runtime`` offers ``precision``."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if precision not in RUNTIME_PRECISIONS[runtime]:
        raise ValueError(
            f"runtime={runtime!r} offers precision {RUNTIME_PRECISIONS[runtime]}, got {precision!r} "
            f"(all: {RUNTIME_PRECISIONS})"
        )


def required_modules(runtime: str, precision: str) -> tuple[str, ...]:
    """Python modules the runtime needs for this precision (the exporter's, the runtime's, the quantiser's)."""
    if runtime == "torch":
        return ()
    needed = [*_EXPORT_MODULES, runtime]
    if precision == "int8" and runtime != "onnxruntime":
        needed.append("onnxruntime")  # the quantiser
    return tuple(needed)


def missing_modules(runtime: str, precision: str) -> list[str]:
    """The modules of :func:`required_modules` that cannot be imported here (imports them as a side effect)."""
    missing = []
    for name in required_modules(runtime, precision):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


# ---------------------------------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and the quantiser's progress messages, logging and warnings."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "root")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(network: nn.Module, shape: tuple[int, int]) -> bytes:
    """The ONNX graph (serialised ``ModelProto``) of ``network``'s BatchNorm-folded float32 copy.

    Input ``amplitudes`` (B, C, N, N) float32 with C = ``network.in_channels`` (default 1) and (N, N) = ``shape``,
    dynamic batch B; output ``phase`` (B, 1, N, N) float32 (rad). ``network`` is not modified.

    Raises
    ------
    ImportError
        If ``onnx`` or ``onnxscript`` (the ``onnx`` extra) is missing.
    """
    folded = prepare_network(network, "fp32", device="cpu").net.to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, int(getattr(network, "in_channels", 1)), *(int(n) for n in shape))
    with _quiet():
        program = torch.onnx.export(
            folded, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    return program.model_proto.SerializeToString()


def _float_nodes(graph_bytes: bytes) -> list[str]:
    """Names of the nodes kept in float32 by the int8 quantisation: the first residual block (up to the first
    ``Add``) and the head (the nodes after the last ``Concat``: the two full-resolution blocks that write the phase)."""
    nodes = list(importlib.import_module("onnx").load_from_string(graph_bytes).graph.node)
    adds = [i for i, node in enumerate(nodes) if node.op_type == "Add"]
    concats = [i for i, node in enumerate(nodes) if node.op_type == "Concat"]
    keep = set(range(adds[0] + 1 if adds else 0))
    keep.update(range(concats[-1] + 1 if concats else len(nodes), len(nodes)))
    return [nodes[i].name for i in sorted(keep)]


def _saturation_safe() -> bool:
    """Whether the CPU multiplies uint8 by int8 without saturating (VNNI); without it weights use 7 bits."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni") or caps.get("amx_int8"))


def quantize_onnx(graph_bytes: bytes, calibration: np.ndarray, batch_size: int = 64) -> bytes:
    """The int8 (QDQ) graph of an :func:`export_onnx` graph, calibrated on ``calibration`` (K, C, N, N) inputs.

    Weights int8 per output channel, activations uint8 with min/max ranges over the calibration inputs (fed
    ``batch_size`` at a time); the first residual block and the head stay float32 (see the module's docstring).

    Raises
    ------
    ImportError
        If ``onnxruntime`` or ``onnx`` is missing.
    ValueError
        If ``calibration`` is not a non-empty (K, C, N, N) array.
    """
    quantization = importlib.import_module("onnxruntime.quantization")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration must be a non-empty (K, C, N, N) array, got shape {calibration.shape}")
    batches = iter([{INPUT_NAME: calibration[i : i + batch_size]} for i in range(0, len(calibration), batch_size)])

    class _Reader(quantization.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    with tempfile.TemporaryDirectory() as folder, _quiet():
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(graph_bytes)
        quantization.quantize_static(
            str(source), str(target), _Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            reduce_range=not _saturation_safe(), activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8, nodes_to_exclude=_float_nodes(graph_bytes),
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
        return target.read_bytes()


# ---------------------------------------------------------------------------------------------------- sessions
class RuntimeNetwork:
    """A graph running in ONNX Runtime or OpenVINO, called like a :class:`~py4dstem_deepcdi.runtime.PreparedNetwork`:
    (B, C, N, N) float input (torch) → (B, 1, N, N) float32 phase (rad, torch, CPU).

    Attributes: ``runtime``, ``precision`` (the one in use), ``threads``, ``compiled`` (always False: every batch
    size runs without padding).
    """

    compiled = False

    def __init__(self, runtime: str, precision: str, threads: int, run: Callable[[np.ndarray], np.ndarray]):
        self.runtime, self.precision, self.threads = runtime, precision, int(threads)
        self._run = run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.array(self._run(array), dtype=np.float32, copy=True))

    def __repr__(self) -> str:
        return f"RuntimeNetwork({self.runtime}, {self.precision}, threads={self.threads})"


def onnxruntime_network(graph_bytes: bytes, precision: str, threads: int) -> RuntimeNetwork:
    """An ONNX Runtime CPU session of ``graph_bytes`` (float32, or the QDQ graph for ``precision="int8"``)."""
    ort = importlib.import_module("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(graph_bytes, options, providers=["CPUExecutionProvider"])
    return RuntimeNetwork("onnxruntime", precision, threads, lambda x: session.run(None, {INPUT_NAME: x})[0])


@functools.cache
def openvino_bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin runs bfloat16 natively here (AVX512-BF16 or AMX)."""
    core = importlib.import_module("openvino").Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_network(graph_bytes: bytes, precision: str, threads: int) -> RuntimeNetwork:
    """An OpenVINO CPU compiled model of ``graph_bytes``; ``precision`` sets the inference-precision hint (``bf16``;
    ``fp32`` and ``int8``, whose graph carries its own quantisation, keep float32 elsewhere)."""
    ov = importlib.import_module("openvino")
    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": int(threads),
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = core.compile_model(core.read_model(io.BytesIO(graph_bytes)), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data

    return RuntimeNetwork("openvino", precision, threads, run)


# ---------------------------------------------------------------------------------------------------- caching
def runtime_network(
    model, runtime: str, precision: str, calibration: Callable[[], np.ndarray] | None = None
) -> RuntimeNetwork:
    """The ONNX Runtime or OpenVINO network of ``model`` (a :class:`~py4dstem_deepcdi.models.DeepCDIModel`).

    The exported graph, its int8 version and the sessions (one per runtime, precision and thread count) are cached
    on the model and made again when its weights change. ``calibration`` returns the (K, C, N, N) calibration inputs;
    it is called only when an int8 graph has to be made. OpenVINO ``bf16`` falls back to ``fp32`` with a
    ``RuntimeWarning`` where bfloat16 is not native.

    Raises
    ------
    ValueError
        For an unknown runtime or precision (:func:`check_runtime`), ``runtime="torch"``, or ``precision="int8"``
        without ``calibration``.
    ImportError
        If the runtime's packages are missing (:func:`inference_network` falls back to torch instead).
    """
    check_runtime(runtime, precision)
    if runtime == "torch":
        raise ValueError("runtime_network is for the optional runtimes; use runtime.prepared_network for torch")
    if runtime == "openvino" and precision == "bf16" and not openvino_bf16_supported():
        warnings.warn(
            "bfloat16 is not native on this CPU for OpenVINO (needs AVX512-BF16 or AMX); using precision='fp32'",
            RuntimeWarning,
            stacklevel=2,
        )
        precision = "fp32"
    cache: dict[Any, Any] = model.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
    fingerprint = (id(model.network), weights_fingerprint(model.network))
    if cache.get("fingerprint") != fingerprint:
        cache.clear()
        cache["fingerprint"] = fingerprint
    threads = torch.get_num_threads()
    key = (runtime, precision, threads)
    if precision == "int8" and "int8" not in cache and calibration is None:
        raise ValueError("precision='int8' needs calibration inputs (calibration=...) to quantise")
    if key not in cache:
        if "fp32" not in cache:
            cache["fp32"] = export_onnx(model.network, tuple(model.geometry.detector_shape))
        graph = cache["fp32"]
        if precision == "int8":
            if "int8" not in cache:
                cache["int8"] = quantize_onnx(graph, calibration())
            graph = cache["int8"]
        make = onnxruntime_network if runtime == "onnxruntime" else openvino_network
        cache[key] = make(graph, precision, threads)
    return cache[key]


def inference_network(
    model,
    runtime: str = "torch",
    precision: str = "bf16",
    device: str | torch.device = "cpu",
    compile: bool = False,  # noqa: A002 - the documented keyword
    calibration: Callable[[], np.ndarray] | None = None,
) -> PreparedNetwork | RuntimeNetwork:
    """The network that predicts for ``model``: torch's prepared network or an optional runtime's, cached on it.

    Parameters
    ----------
    model
        A :class:`~py4dstem_deepcdi.models.DeepCDIModel`.
    runtime
        ``"torch"`` (default: :func:`~py4dstem_deepcdi.runtime.prepared_network`), ``"onnxruntime"`` or
        ``"openvino"`` (CPU only). When the optional runtime's packages are missing, a ``RuntimeWarning`` names the
        pip extra to install and torch runs instead, at the same precision or ``"fp32"`` for ``"int8"``.
    precision
        One of ``RUNTIME_PRECISIONS[runtime]``: torch ``bf16``/``fp32``, onnxruntime ``fp32``/``int8``, openvino
        ``fp32``/``bf16``/``int8``.
    device, compile
        For torch: the device and ``torch.compile`` (:func:`~py4dstem_deepcdi.runtime.prepare_network`). The other
        runtimes run on the CPU and compile their own graph.
    calibration
        Returns the (K, C, N, N) float32 inputs that calibrate an int8 graph (called only when one is made).

    Returns
    -------
    PreparedNetwork or RuntimeNetwork
        Maps a (B, C, N, N) float input (torch) to a (B, 1, N, N) float32 phase (rad).

    Raises
    ------
    ValueError
        For an unknown runtime, a precision the runtime does not offer, an optional runtime with a GPU device or
        ``compile=True``, or ``int8`` without ``calibration``.
    """
    check_runtime(runtime, precision)
    if runtime == "torch":
        return prepared_network(model, precision, device, compile)
    dev = torch_device(device) if not isinstance(device, torch.device) else device
    if dev.type != "cpu":
        raise ValueError(f"runtime={runtime!r} runs on the CPU; use runtime='torch' for device={str(device)!r}")
    if compile:
        raise ValueError(f"compile=True is torch.compile, for runtime='torch'; runtime={runtime!r} compiles its own")
    missing = missing_modules(runtime, precision)
    if missing:
        fallback = precision if precision in RUNTIME_PRECISIONS["torch"] else "fp32"
        warnings.warn(
            f"runtime={runtime!r} needs {', '.join(missing)}, which cannot be imported: "
            f"pip install \"py4dstem-deepcdi[{EXTRAS[runtime]}]\"; using runtime='torch', precision={fallback!r}",
            RuntimeWarning,
            stacklevel=2,
        )
        return prepared_network(model, fallback, dev, False)
    return runtime_network(model, runtime, precision, calibration)


def clear_cache(model) -> None:
    """Drop the graphs and sessions of the optional runtimes cached on ``model``."""
    model.__dict__.pop(_CACHE_ATTRIBUTE, None)
