"""Model files: network weights plus the metadata that says what the network was trained for.

A model file is a ``torch.save`` dictionary holding only tensors, strings and numbers, read back with
``torch.load(..., weights_only=True)`` so loading never executes pickled code. Keys: ``format``
(``"py4dstem-deepcdi-model"``), ``format_version``, ``metadata`` (JSON text: geometry, network, training set,
training summary, package version), ``state_dict`` (weights, optionally float16) and, when the geometry used a
measured vacuum probe, ``vacuum_probe_intensity``.

A file is not trusted: :func:`load_model` checks every metadata field against the bounds below
(:func:`check_metadata`), the network's size, and the shape of every stored tensor against the declared network
(built without memory on torch's ``meta`` device) before anything is built, and refuses non-finite weights.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .backend import torch_device
from .io import atomic_path, check_writable
from .network import ResUNet, count_parameters
from .probe import POLAR_NAMES, AberrationRanges, ProbeGeometry

MODEL_FORMAT = "py4dstem-deepcdi-model"
MODEL_FORMAT_VERSION = 1
PRETRAINED_PACKAGE = "py4dstem_deepcdi.pretrained"

# ---------------------------------------------------------------- what a model file may declare (checked on load)
#: (low, high), inclusive, of the network's settings; the paper's network is width 1, depth 4 (9.4 M parameters)
NETWORK_BOUNDS = {"width": (1 / 64, 4.0), "depth": (1, 6), "dropout": (0.0, 0.9)}
NETWORK_DEFAULTS = {"width": 1.0, "depth": 4, "dropout": 0.2, "in_channels": 1}  # ResUNet's, for absent fields
#: the largest network a file may declare (400 MB of float32 weights)
MAX_PARAMETERS = 100_000_000
#: (low, high) of the geometry's numbers: eV, mrad, mrad/pixel, mrad, pixels per detector side
GEOMETRY_BOUNDS = {
    "energy_eV": (1e3, 5e6),
    "semiangle_cutoff_mrad": (0.1, 500.0),
    "angular_sampling_mrad": (1e-3, 100.0),
    "rolloff_mrad": (0.0, 100.0),
    "mask_threshold": (1e-6, 1 - 1e-6),
}
DETECTOR_BOUNDS = (8, 1024)
#: |aberration| bounds: magnitudes (Å, 1e7 Å = 1 mm) and angles (rad)
ABERRATION_BOUNDS = {"magnitude": 1e7, "angle": 100.0}
#: (low, high) of the training ranges: e⁻/pattern, rad, mrad, Å
TRAINING_SET_BOUNDS = {
    "electrons_range": (1e-3, 1e15),
    "phase_max_range": (1e-6, 100.0),
    "edge_width_range": (0.0, 100.0),
    "pool_step_range": (1e-3, 100.0),
}


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
        """Write the model file atomically; ``half_precision`` stores float weights as float16 (half the size).

        Raises ``FileExistsError`` for an existing ``path`` unless ``overwrite``, ``ValueError`` for metadata that
        :func:`load_model` would refuse (:func:`check_metadata`), ``OSError`` naming ``path`` if it cannot be written.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        check_writable(path)
        state = {
            k: (v.half() if half_precision and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in self.network.state_dict().items()
        }
        metadata = dict(self.metadata)
        metadata["geometry"] = self.geometry.to_dict()
        metadata["network"] = self.network.config()
        metadata.setdefault("version", __version__)
        metadata.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        check_metadata(json.loads(json.dumps(metadata)), where=str(path))
        payload: dict[str, Any] = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "metadata": json.dumps(metadata),
            "state_dict": state,
        }
        if self.geometry.vacuum_probe_intensity is not None:
            payload["vacuum_probe_intensity"] = torch.from_numpy(self.geometry.vacuum_probe_intensity.copy())
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk raises OSError (errno)
            torch.save(payload, f)
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
    def edge_width_range(self) -> tuple[float, float] | None:
        """The aperture-edge widths (mrad) a fixed-probe network was trained over; None when not drawn."""
        widths = self.metadata.get("training_set", {}).get("edge_width_range")
        return (float(widths[0]), float(widths[1])) if widths else None

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


def _refuse(where: str, field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(
        f"{where}: metadata field {field_name} = {value!r} is outside the allowed {allowed}; the file is damaged or "
        "was not written by py4dstem-deepcdi (refused before building anything)"
    )


def _number(where: str, field_name: str, value: Any, bounds: tuple[float, float], integer: bool = False) -> float:
    """``value`` as a float, or ``ValueError`` naming the field unless it is a finite number within ``bounds``."""
    low, high = bounds
    allowed = f"{'integers' if integer else 'range'} [{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(where, field_name, value, allowed)
    if not (math.isfinite(value) and low <= value <= high) or (integer and not isinstance(value, int)):
        raise _refuse(where, field_name, value, allowed)
    return float(value)


def _pair(where: str, field_name: str, value: Any, bounds: tuple[float, float]) -> None:
    """``ValueError`` unless ``value`` is an increasing (min, max) pair of numbers within ``bounds``."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _refuse(where, field_name, value, f"(min, max) pairs within [{bounds[0]:g}, {bounds[1]:g}]")
    low, high = (_number(where, f"{field_name}[{i}]", v, bounds) for i, v in enumerate(value))
    if low > high:
        raise _refuse(where, field_name, value, "(min, max) pairs with min <= max")


def _section(where: str, metadata: dict[str, Any], name: str, required: bool) -> dict[str, Any]:
    section = metadata.get(name, None if required else {})
    if not isinstance(section, dict):
        raise _refuse(where, name, section, "form (a JSON object)")
    return section


def _check_geometry(where: str, geometry: dict[str, Any], depth: int) -> None:
    for name, bounds in GEOMETRY_BOUNDS.items():
        _number(where, f"geometry.{name}", geometry.get(name), bounds)
    shape = geometry.get("detector_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 2:
        raise _refuse(where, "geometry.detector_shape", shape, "form (two pixel counts)")
    for n in shape:
        _number(where, "geometry.detector_shape", n, DETECTOR_BOUNDS, integer=True)
        if int(n) % 2**depth:
            raise _refuse(where, "geometry.detector_shape", shape, f"shapes: divisible by 2**depth = {2**depth}")
    aberrations = geometry.get("aberrations")
    if not isinstance(aberrations, dict) or not set(aberrations) <= set(POLAR_NAMES):
        raise _refuse(where, "geometry.aberrations", aberrations, f"names ({', '.join(POLAR_NAMES)})")
    for name, value in aberrations.items():
        bound = ABERRATION_BOUNDS["angle" if name.startswith("phi") else "magnitude"]
        _number(where, f"geometry.aberrations.{name}", value, (-bound, bound))


def _check_training_set(where: str, trained: dict[str, Any], in_channels: int) -> None:
    for name, bounds in TRAINING_SET_BOUNDS.items():
        if trained.get(name) is not None:
            _pair(where, f"training_set.{name}", trained[name], bounds)
    pool = trained.get("pool", 1)
    if pool not in (1, 3) or isinstance(pool, bool):
        raise _refuse(where, "training_set.pool", pool, "values (1 or 3)")
    ranges = trained.get("aberration_ranges")
    if ranges is not None:
        if not isinstance(ranges, dict):
            raise _refuse(where, "training_set.aberration_ranges", ranges, "form (C10, C12, C21, C23)")
        bound = ABERRATION_BOUNDS["magnitude"]
        _pair(where, "training_set.aberration_ranges.C10", ranges.get("C10"), (-bound, bound))
        for name in ("C12", "C21", "C23"):
            _number(where, f"training_set.aberration_ranges.{name}", ranges.get(name), (0.0, bound))
    wants_three = pool == 3 or ranges is not None
    if wants_three != (in_channels == 3):
        raise _refuse(
            where, "network.in_channels", in_channels,
            "value: 3 for a probe-conditioned (training_set.aberration_ranges) or pooled (training_set.pool = 3) "
            "network, else 1",
        )


def _check_derived(where: str, stored: dict[str, Any], geometry: ProbeGeometry) -> None:
    """``ValueError`` when the stored wavelength (Å) or real-space sampling (Å) disagree with the geometry's own
    (a hand-edited energy or detector pixel) by more than 0.1 %."""
    for name, value in (("wavelength_A", [geometry.wavelength]), ("sampling_A", list(geometry.sampling))):
        given = stored.get(name)
        if given is None:
            continue
        given = given if isinstance(given, list) else [given]
        if len(given) != len(value) or not all(
            isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-3) for a, b in zip(given, value)
        ):
            raise _refuse(where, f"geometry.{name}", stored[name], f"value: {value} (from the energy and sampling)")


def check_metadata(metadata: Any, where: str = "model file") -> None:
    """Check a model file's metadata against the bounds of this module before anything is built from it.

    Checked: the network (``width``, ``depth``, ``dropout`` within ``NETWORK_BOUNDS``, ``in_channels`` 1 or 3 and
    consistent with the training set, at most ``MAX_PARAMETERS`` parameters), the geometry (numbers within
    ``GEOMETRY_BOUNDS``, a detector of ``DETECTOR_BOUNDS`` pixels per side divisible by ``2**depth``, known
    aberrations within ``ABERRATION_BOUNDS``), the training ranges (``TRAINING_SET_BOUNDS``, ``pool``,
    ``aberration_ranges``). ``where`` names the file in the messages.

    Raises
    ------
    ValueError
        Naming the field, its value and the allowed range.
    """
    if not isinstance(metadata, dict):
        raise _refuse(where, "metadata", type(metadata).__name__, "form (a JSON object)")
    network = _section(where, metadata, "network", required=True)
    if not set(network) <= set(NETWORK_DEFAULTS):
        raise _refuse(where, "network", sorted(network), f"keys ({', '.join(NETWORK_DEFAULTS)})")
    network = {**NETWORK_DEFAULTS, **network}
    for name, bounds in NETWORK_BOUNDS.items():
        _number(where, f"network.{name}", network[name], bounds, integer=name == "depth")
    if network["in_channels"] not in (1, 3) or isinstance(network["in_channels"], bool):
        raise _refuse(where, "network.in_channels", network["in_channels"], "values (1 or 3)")
    _check_geometry(where, _section(where, metadata, "geometry", required=True), int(network["depth"]))
    _check_training_set(where, _section(where, metadata, "training_set", required=False), network["in_channels"])
    with torch.device("meta"):  # the declared network without memory: its size
        parameters = count_parameters(ResUNet(**network))
    if parameters > MAX_PARAMETERS:
        raise _refuse(where, "network (width, depth)", f"{parameters:,} parameters", f"size (<= {MAX_PARAMETERS:,})")


def check_state_dict(state: Any, network_config: dict[str, Any], where: str = "model file") -> None:
    """``ValueError`` unless ``state`` holds exactly the tensors of the declared network, with their shapes, finite.

    The network is built on torch's ``meta`` device (no memory) to read the expected names and shapes.
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: state_dict is not a dictionary of tensors")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ResUNet(**network_config).state_dict().items()}
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"{where}: the weights do not belong to the declared network {network_config} "
            f"(missing {missing[:3]}, unknown {unknown[:3]})"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"{where}: weight {name} has shape {tuple(state[name].shape)}, the declared network "
                f"{network_config} needs {shape}"
            )
        if state[name].is_floating_point() and not bool(torch.isfinite(state[name]).all()):
            raise ValueError(f"{where}: weight {name} holds NaN or infinite values")


def _read_payload(path: Path) -> dict[str, Any]:
    """The dictionary of a model file (safe load, format tag and version checked)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable py4dstem-deepcdi model file (truncated, corrupt or another format): {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{str(path)!r} is not a py4dstem-deepcdi model file (no '{MODEL_FORMAT}' format tag)")
    version = payload.get("format_version", -1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(path)!r} is a damaged model file: format_version {version!r} is not a version (>= 1)")
    if version > MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has model format version {version}, newer than this package reads "
            f"({MODEL_FORMAT_VERSION}); upgrade py4dstem-deepcdi"
        )
    return payload


def load_model(path: str | Path, device: str = "cpu") -> DeepCDIModel:
    """Load a model file safely: ``weights_only=True`` (no pickled code), then every metadata field checked against
    sane bounds (:func:`check_metadata`) and every tensor against the declared network (:func:`check_state_dict`)
    before the network is built.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the field, its value and the allowed
    range) for a corrupt, foreign or out-of-bounds one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    payload = _read_payload(path)
    where = repr(str(path))
    try:
        metadata = json.loads(payload["metadata"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} is a damaged model file (metadata): {exc}") from exc
    check_metadata(metadata, where)
    vacuum = payload.get("vacuum_probe_intensity")
    declared = metadata["geometry"].get("has_vacuum_probe")
    if declared is not None and bool(declared) != (vacuum is not None):
        raise _refuse(where, "geometry.has_vacuum_probe", declared, "value: true when the file holds a vacuum probe")
    if vacuum is not None and (not isinstance(vacuum, torch.Tensor) or vacuum.ndim != 2):
        raise ValueError(f"{where}: vacuum_probe_intensity is not a 2-D tensor")
    check_state_dict(payload.get("state_dict"), metadata["network"], where)
    try:
        geometry = ProbeGeometry.from_dict(metadata["geometry"], None if vacuum is None else vacuum.numpy())
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where} is a damaged model file (geometry): {exc}") from exc
    _check_derived(where, metadata["geometry"], geometry)
    network = ResUNet(**metadata["network"])
    network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
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
