"""Model files: network weights plus the metadata that says what the network was trained for.

A model file is a ``torch.save`` dictionary holding only tensors, strings and numbers, read back with
``torch.load(..., weights_only=True)`` so loading never executes pickled code. Keys: ``format``
(``"py4dstem-deepcdi-model"``), ``format_version``, ``metadata`` (JSON text: geometry, network, training set,
training summary, package version), ``state_dict`` (weights, optionally float16) and, when the geometry used a
measured vacuum probe, ``vacuum_probe_intensity``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .backend import torch_device
from .io import atomic_path
from .network import ResUNet
from .probe import AberrationRanges, ProbeGeometry

MODEL_FORMAT = "py4dstem-deepcdi-model"
MODEL_FORMAT_VERSION = 1
PRETRAINED_PACKAGE = "py4dstem_deepcdi.pretrained"


@dataclass
class DeepCDIModel:
    """A trained network with its geometry and metadata.

    Attributes: ``network`` (:class:`ResUNet`, eval mode), ``geometry`` (:class:`ProbeGeometry` it was trained
    for), ``metadata`` (dict: ``training_set``, ``training``, ``version``, ...).
    """

    network: ResUNet
    geometry: ProbeGeometry
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path, half_precision: bool = False, overwrite: bool = False) -> Path:
        """Write the model file atomically; ``half_precision`` stores float weights as float16 (half the size)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        state = {
            k: (v.half() if half_precision and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in self.network.state_dict().items()
        }
        metadata = dict(self.metadata)
        metadata["geometry"] = self.geometry.to_dict()
        metadata["network"] = self.network.config()
        metadata.setdefault("version", __version__)
        metadata.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        payload: dict[str, Any] = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "metadata": json.dumps(metadata),
            "state_dict": state,
        }
        if self.geometry.vacuum_probe_intensity is not None:
            payload["vacuum_probe_intensity"] = torch.from_numpy(self.geometry.vacuum_probe_intensity.copy())
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    @property
    def pool(self) -> int:
        """1, or 3 for a pooled network (it also takes the summed 3×3 scan neighbourhood, see :mod:`.encoding`)."""
        return int(self.metadata.get("training_set", {}).get("pool", 1))

    @property
    def pool_step_range(self) -> tuple[float, float] | None:
        """The scan steps (Å) a pooled network was trained for; None for a network that sees one pattern."""
        steps = self.metadata.get("training_set", {}).get("pool_step_range")
        return (float(steps[0]), float(steps[1])) if self.pool > 1 and steps else None

    @property
    def conditioned(self) -> bool:
        """Whether the network is probe-conditioned (takes the probe as input, see :attr:`aberration_ranges`)."""
        return getattr(self.network, "in_channels", 1) == 3 and self.pool == 1

    @property
    def aberration_ranges(self) -> AberrationRanges | None:
        """The probe ranges a probe-conditioned network was trained over (None for a fixed-probe network)."""
        ranges = self.metadata.get("training_set", {}).get("aberration_ranges")
        return AberrationRanges.from_dict(ranges) if self.conditioned and ranges else None

    @property
    def electrons_range(self) -> tuple[float, float] | None:
        """The electrons per pattern the network was trained on, (min, max); None when the file does not say."""
        trained = self.metadata.get("training_set", {}).get("electrons_range")
        return (float(trained[0]), float(trained[1])) if trained else None

    def check_compatible(self, geometry: ProbeGeometry, **tolerances) -> None:
        """Raise ``ValueError`` (naming both values) if ``geometry`` differs from the model's beyond tolerance.

        A probe-conditioned model accepts any aberrations inside its training ranges.
        """
        if not self.conditioned:
            self.geometry.check_compatible(geometry, **tolerances)
            return
        self.geometry.check_compatible(geometry, **{**tolerances, "aberration_atol": float("inf")})
        ranges = self.aberration_ranges
        problems = ranges.contains(geometry.aberrations) if ranges is not None else []
        if problems:
            raise ValueError(
                "the probe-conditioned model was trained for probes in "
                f"{ranges.to_dict()} (Å); this probe has {'; '.join(problems)}. "
                "Train a model over wider ranges (deepcdi train --condition-probe ...)"
            )

    def require_conditioned(self, what: str) -> None:
        """Raise ``ValueError`` unless the network is probe-conditioned (``what`` names the caller)."""
        if not self.conditioned:
            raise ValueError(
                f"{what} needs a probe-conditioned model (one trained with aberration_ranges, 3 input channels); "
                f"{self.metadata.get('name', 'this model')!r} was trained for one fixed probe "
                f"({self.geometry!r}). Train one with `deepcdi train --condition-probe ...`"
            )

    def __repr__(self) -> str:
        training = self.metadata.get("training", {})
        conditioned = f", probe-conditioned over {self.aberration_ranges.to_dict()}" if self.conditioned else ""
        if self.pool > 1:
            conditioned = f", pooled over 3×3 neighbourhoods of scan steps {self.pool_step_range} Å"
        return (
            f"DeepCDIModel({self.metadata.get('name', 'unnamed')}, {self.geometry!r}{conditioned}, "
            f"width={self.network.width}, "
            f"depth={self.network.depth}, samples={training.get('samples', '?')}, "
            f"val_L1={training.get('val_l1', '?')})"
        )


def load_model(path: str | Path, device: str = "cpu") -> DeepCDIModel:
    """Load a model file safely (``weights_only=True``); clear ``ValueError`` for a corrupt or foreign file."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable py4dstem-deepcdi model file (truncated, corrupt or another format): {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{str(path)!r} is not a py4dstem-deepcdi model file (no '{MODEL_FORMAT}' format tag)")
    if int(payload.get("format_version", -1)) > MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has model format version {payload['format_version']}, newer than this package reads "
            f"({MODEL_FORMAT_VERSION}); upgrade py4dstem-deepcdi"
        )
    try:
        metadata = json.loads(payload["metadata"])
        vacuum = payload.get("vacuum_probe_intensity")
        geometry = ProbeGeometry.from_dict(metadata["geometry"], None if vacuum is None else vacuum.numpy())
        network = ResUNet(**metadata["network"])
        network.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        )
    except (KeyError, RuntimeError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is a damaged model file: {exc}") from exc
    network.eval().to(torch_device(device))
    return DeepCDIModel(network, geometry, metadata)


def list_pretrained() -> dict[str, dict[str, Any]]:
    """Shipped models: name → summary (geometry, training) read from the files inside the package."""
    out = {}
    for entry in resources.files(PRETRAINED_PACKAGE).iterdir():
        if entry.name.endswith(".pt"):
            with resources.as_file(entry) as path:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            metadata = json.loads(payload["metadata"])
            out[entry.name[:-3]] = {
                "geometry": metadata["geometry"],
                "training": metadata.get("training", {}),
                "description": metadata.get("description", ""),
                "aberration_ranges": metadata.get("training_set", {}).get("aberration_ranges"),
            }
    return out


def load_pretrained(name: str = "hbn-300kv-17mrad", device: str = "cpu") -> DeepCDIModel:
    """Load a model shipped inside the package by name (see :func:`list_pretrained`); no network access."""
    entry = resources.files(PRETRAINED_PACKAGE) / f"{name}.pt"
    if not entry.is_file():
        names = ", ".join(sorted(list_pretrained())) or "none"
        raise ValueError(f"no shipped model named {name!r}; shipped models: {names}")
    with resources.as_file(entry) as path:
        return load_model(path, device=device)


def as_model(model: DeepCDIModel | str | Path | None, device: str = "cpu") -> DeepCDIModel:
    """Accept a model object, a model file path, a shipped model name, or None (the default shipped model)."""
    if model is None:
        return load_pretrained(device=device)
    if isinstance(model, DeepCDIModel):
        return model
    path = Path(model)
    if path.suffix == ".pt" or path.exists():
        return load_model(path, device=device)
    return load_pretrained(str(model), device=device)
