"""The optional runtimes (ONNX Runtime, OpenVINO): the same patches as torch fp32, the cache, the fallback, the names.

Tolerances, against torch's fp32 patches of the same network on training-stream samples:

- fp32: max |difference| ≤ 1e-5 × max |patch| (the same float32 arithmetic in another order);
- bf16: correlation > 0.998 (bfloat16 keeps 8 significant bits, ~0.4 % per operation; torch's own bf16 path of
  these random networks reaches ~0.9993-0.9996, OpenVINO's ~0.9995-0.9998: the bound leaves 4× that error);
- int8: correlation > 0.99 (8-bit activations with min/max ranges, ~1/255 of each activation's range per layer, over
  ~40 quantised layers; these random networks reach ~0.997, the shipped model ~0.999; bench/runtimes.py checks the
  criterion that matters, a stitched image's correlation with the truth within 0.005 of fp32's).
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from networks import random_network

from py4dstem_deepcdi import cli, runtimes
from py4dstem_deepcdi.inference import calibration_inputs, predict, predict_batches
from py4dstem_deepcdi.models import DeepCDIModel
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.runtime import prepared_network
from py4dstem_deepcdi.runtimes import RuntimeNetwork, check_runtime, inference_network
from py4dstem_deepcdi.scan import neighbour_offsets

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTH = 0.25
FP32_RTOL = 1e-5
BF16_CORRELATION = 0.998
INT8_CORRELATION = 0.99


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _needs(*modules: str) -> None:
    for name in modules:
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def geometry_small():
    return ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)


@pytest.fixture(scope="module")
def model(geometry_small):
    """A fixed-probe model of a small random network (non-trivial BatchNorms), shared: its exports are cached."""
    return DeepCDIModel(random_network(WIDTH), geometry_small, {"name": "test"})


@pytest.fixture(scope="module")
def amplitudes(model):
    """Training-stream samples (not the calibration ones: another seed)."""
    return calibration_inputs(model, 40, seed=7)[:, 0]


@pytest.fixture(scope="module")
def reference(model, amplitudes):
    return predict(model, amplitudes, precision="fp32")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_fp32_matches_torch(model, amplitudes, reference, runtime):
    _needs(*runtimes.required_modules(runtime, "fp32"))
    out = predict(model, amplitudes, runtime=runtime, precision="fp32", batch_size=16)  # batches of 16, 16, 8
    np.testing.assert_allclose(out, reference, rtol=0, atol=FP32_RTOL * np.abs(reference).max())
    net = inference_network(model, runtime, "fp32")
    assert isinstance(net, RuntimeNetwork) and (net.runtime, net.precision) == (runtime, "fp32")


def test_openvino_bf16_close_to_fp32(model, amplitudes, reference):
    _needs(*runtimes.required_modules("openvino", "bf16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 not native here: it runs fp32
        out = predict(model, amplitudes, runtime="openvino", precision="bf16")
    assert _correlation(out, reference) > BF16_CORRELATION


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_close_to_fp32(model, amplitudes, reference, runtime):
    _needs(*runtimes.required_modules(runtime, "int8"))
    out = predict(model, amplitudes, runtime=runtime, precision="int8")
    assert _correlation(out, reference) > INT8_CORRELATION
    assert not np.allclose(out, reference, atol=FP32_RTOL * np.abs(reference).max())  # really quantised
    assert np.all(out[:, ~model.geometry.mask] == 0)


def test_graphs_are_cached_and_made_again_when_the_weights_change(geometry_small, amplitudes):
    _needs(*runtimes.required_modules("onnxruntime", "fp32"))
    torch.manual_seed(3)
    model = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry_small, {"name": "cached"})
    first = inference_network(model, "onnxruntime", "fp32")
    assert inference_network(model, "onnxruntime", "fp32") is first
    with torch.no_grad():
        model.network.stem.conv1.weight.mul_(1.5)
    second = inference_network(model, "onnxruntime", "fp32")
    assert second is not first
    expected = predict(model, amplitudes, precision="fp32")
    out = predict(model, amplitudes, runtime="onnxruntime", precision="fp32")
    np.testing.assert_allclose(out, expected, rtol=0, atol=FP32_RTOL * np.abs(expected).max())
    runtimes.clear_cache(model)
    assert not hasattr(model, "_deepcdi_runtime_networks")


def test_three_channel_models(geometry_small, amplitudes):
    """A probe-conditioned and a pooled network (3 input channels), exported and run like the torch network; the
    pooled model's int8 graph is calibrated on its own (pooled) training stream."""
    _needs(*runtimes.required_modules("openvino", "int8"))
    torch.manual_seed(2)
    conditioned = DeepCDIModel(ResUNet(width=0.125, depth=2, in_channels=3).eval(), geometry_small, {})
    expected = predict(conditioned, amplitudes, precision="fp32")
    out = predict(conditioned, amplitudes, runtime="openvino", precision="fp32")
    np.testing.assert_allclose(out, expected, rtol=0, atol=FP32_RTOL * np.abs(expected).max())

    pooled_model = DeepCDIModel(ResUNet(width=0.125, depth=2, in_channels=3).eval(), geometry_small,
                                {"training_set": {"pool": 3}})
    calibration = calibration_inputs(pooled_model, 16)
    assert calibration.shape == (16, 3, *geometry_small.detector_shape)
    offsets = neighbour_offsets(0.25, 30.0)
    pooled = amplitudes[::-1].copy()
    kwargs = {"pooled": pooled, "neighbour_offsets": offsets}
    expected = predict(pooled_model, amplitudes, precision="fp32", **kwargs)
    out = predict(pooled_model, amplitudes, runtime="onnxruntime", precision="fp32", **kwargs)
    np.testing.assert_allclose(out, expected, rtol=0, atol=FP32_RTOL * np.abs(expected).max())
    chunks = ((amplitudes[s:e], pooled[s:e]) for s, e in ((0, 10), (10, len(amplitudes))))
    streamed = np.concatenate(list(predict_batches(pooled_model, chunks, runtime="openvino", precision="int8",
                                                   neighbour_offsets=offsets)))
    assert _correlation(streamed, expected) > INT8_CORRELATION


def test_calibration_inputs_are_the_reproducible_training_stream(model):
    a = calibration_inputs(model, 8)
    assert a.shape == (8, 1, 32, 32) and a.dtype == np.float32 and np.all(a >= 0)
    np.testing.assert_array_equal(a, calibration_inputs(model, 8))
    assert not np.array_equal(a, calibration_inputs(model, 8, seed=1))
    with pytest.raises(ValueError, match="samples"):
        calibration_inputs(model, 0)


@pytest.mark.parametrize("runtime, extra", [("onnxruntime", "onnx"), ("openvino", "openvino")])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_missing_runtime_falls_back_to_torch_with_a_warning(model, amplitudes, reference, monkeypatch, runtime,
                                                              extra, precision):
    monkeypatch.setitem(sys.modules, runtime, None)  # `import runtime` now raises ImportError
    with pytest.warns(RuntimeWarning, match=rf'pip install "py4dstem-deepcdi\[{extra}\]".*precision=.fp32.'):
        out = predict(model, amplitudes, runtime=runtime, precision=precision)
    np.testing.assert_array_equal(out, reference)  # torch's own fp32 patches
    with pytest.warns(RuntimeWarning, match=runtime):
        assert inference_network(model, runtime, precision) is prepared_network(model, "fp32")


@pytest.mark.parametrize(
    "runtime, precision, match",
    [
        ("tensorrt", "fp32", r"runtime must be one of \('torch', 'onnxruntime', 'openvino'\)"),
        ("onnxruntime", "bf16", r"runtime='onnxruntime' offers precision \('fp32', 'int8'\), got 'bf16'"),
        ("torch", "int8", r"runtime='torch' offers precision \('bf16', 'fp32'\)"),
        ("openvino", "fp16", r"\('fp32', 'bf16', 'int8'\)"),
    ],
)
def test_bad_runtime_or_precision_raises(model, amplitudes, runtime, precision, match):
    with pytest.raises(ValueError, match=match):
        check_runtime(runtime, precision)
    with pytest.raises(ValueError, match=match):
        predict(model, amplitudes, runtime=runtime, precision=precision)


def test_optional_runtimes_run_on_the_cpu_without_torch_compile(model, amplitudes):
    with pytest.raises(ValueError, match="runs on the CPU"):
        inference_network(model, "onnxruntime", "fp32", device=torch.device("cuda"))
    with pytest.raises(ValueError, match="compile=True is torch.compile"):
        predict(model, amplitudes, runtime="openvino", precision="fp32", compile=True)
    with pytest.raises(ValueError, match="calibration"):
        runtimes.runtime_network(DeepCDIModel(random_network(WIDTH), model.geometry, {}), "onnxruntime", "int8")



class _Recorder:
    """Stands in for DeepCDIReconstruction in the command-line test: records what reconstruct() was given."""

    calls: list[dict] = []
    object_phase, sampling = np.zeros((4, 4)), (0.3, 0.3)

    def preprocess(self):
        return self

    def reconstruct(self, **kwargs):
        self.calls.append(kwargs)
        return self

    def save(self, path, overwrite=False):
        Path(path).touch()


@pytest.mark.parametrize(
    "flags, runtime, precision",
    [([], "torch", "bf16"), (["--runtime", "onnxruntime"], "onnxruntime", "fp32"),
     (["--runtime", "openvino"], "openvino", "bf16"), (["--runtime", "openvino", "--precision", "int8"], "openvino",
                                                       "int8")],
)
def test_command_line_runtime(tmp_path, monkeypatch, flags, runtime, precision):
    """`deepcdi reconstruct --runtime R [--precision P]` hands both to reconstruct(); P defaults per runtime."""
    data = tmp_path / "data.h5"
    data.touch()
    monkeypatch.setattr(cli, "_reconstruction_from_args", lambda args, probe=None: _Recorder())
    _Recorder.calls = []
    argv = ["reconstruct", str(data), "--energy", "300e3", "--semiangle", "17.1", "--output",
            str(tmp_path / "out.h5"), "--quiet", *flags]
    assert cli.main(argv) == 0
    assert (_Recorder.calls[0]["runtime"], _Recorder.calls[0]["precision"]) == (runtime, precision)
    with pytest.raises(SystemExit):
        cli.main([*argv, "--runtime", "tensorrt"])
