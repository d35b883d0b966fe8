"""Compute backends: one code path, numpy or CuPy arrays and CPU or CUDA torch tensors.

py4DSTEM names its devices ``"cpu"`` and ``"gpu"``; torch calls the GPU ``"cuda"``. Every function in this
package that can run on a GPU takes ``device`` and asks this module for its array module (``xp``) or torch
device, so the GPU path is the same code with another backend.
"""

from __future__ import annotations

import types

import numpy as np
import torch

_GPU_WORDS = ("gpu", "cuda")


def _normalise(device: str | torch.device) -> str:
    name = str(device).lower()
    if name == "cpu":
        return "cpu"
    if name in _GPU_WORDS or name.startswith("cuda:"):
        return "gpu"
    raise ValueError(f"device must be 'cpu' or 'gpu' (or 'cuda'), not {device!r}")


def get_array_module(device: str = "cpu") -> types.ModuleType:
    """Return ``numpy`` for ``device="cpu"`` and ``cupy`` for ``device="gpu"``.

    Raises a ``RuntimeError`` that says how to fix it when CuPy or a CUDA GPU is missing.
    """
    if _normalise(device) == "cpu":
        return np
    try:
        import cupy as cp  # noqa: PLC0415 - optional dependency
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "device='gpu' needs CuPy and a CUDA GPU; install them with "
            "`pip install py4dstem-deepcdi[gpu]` or use device='cpu'"
        ) from exc
    try:  # pragma: no cover - needs a GPU
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception as exc:  # pragma: no cover - needs a GPU
        raise RuntimeError("device='gpu' was asked for but CuPy finds no CUDA GPU; use device='cpu'") from exc
    return cp  # pragma: no cover - needs a GPU


def torch_device(device: str | torch.device = "cpu") -> torch.device:
    """Map py4DSTEM's ``"cpu"``/``"gpu"`` (or torch's ``"cuda[:n]"``) to a ``torch.device``, checking CUDA."""
    if _normalise(device) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "device='gpu' was asked for but this PyTorch build sees no CUDA GPU "
            f"(torch {torch.__version__}); install a CUDA build of PyTorch or use device='cpu'"
        )
    name = str(device).lower()  # pragma: no cover - needs a GPU
    return torch.device(name if name.startswith("cuda:") else "cuda")  # pragma: no cover


def asnumpy(array) -> np.ndarray:
    """Copy a numpy, CuPy or torch array to a numpy array on the host."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if hasattr(array, "get") and not isinstance(array, np.ndarray):  # CuPy
        return array.get()
    return np.asarray(array)
