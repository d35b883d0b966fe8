"""A reconstruction in an EMD 1.0 file, the way py4DSTEM's phase classes store themselves (emdfile ``Custom``).

The node (python class ``DeepCDIReconstruction``) holds metadata groups ``instantiation_metadata`` (constructor
arguments), ``aberrations_metadata`` (polar parameters, Å and rad) and ``deepcdi`` (``json``: the summary record,
:meth:`~.results.Results.summary`), and array groups: ``_emd_object_phase`` (a py4DSTEM ``RealSlice`` in rad, axes
in Å of the detector frame), ``_emd_coverage``, ``_emd_error_map`` (rad), ``_emd_positions`` (J, 2) Å,
``_emd_offsets`` (rad), ``_emd_probe`` (complex, axes in Å), and when present ``_emd_patches`` (rad),
``_emd_vacuum_probe_intensity``, ``_emd_model_vacuum_probe_intensity``, ``_emd_initial_scan_positions`` (Å) and
``_emd_positions_mask``. NaNs are stored as they are in memory (:data:`~.results.NAN_POLICY`).

Reading needs this package imported (``py4dstem_deepcdi`` registers the class with emdfile). A reopened
reconstruction holds no datacube (``attach_datacube``) and, unless its model is a shipped one, no network weights
(a :class:`StoredModel`: geometry and metadata; give ``model=`` to reconstruct again). It is reopened on the CPU.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from emdfile import Array, Custom, Metadata, Node, Root, _read_metadata

from ..io import (
    LENGTH_UNITS,
    calibrated_array,
    calibrated_slice,
    check_writable,
    to_json,
    write_nodes,
)
from ..models import PRETRAINED_PACKAGE, DeepCDIModel, load_pretrained
from ..network import ResUNet
from ..probe import ProbeGeometry, vacuum_pattern

RECORD_NAME = "deepcdi"
#: prefix of the attributes (and HDF5 groups) of the stored arrays
PREFIX = "_emd_"
DEFAULT_NAME = "deepcdi_reconstruction"


class StoredModel(DeepCDIModel):
    """A model read back from a reconstruction file: its geometry and metadata, a network without weights (on torch's
    ``meta`` device). It serves ``preprocess()`` and the comparison, not ``reconstruct()``."""

    weights_loaded = False


def reopened_model(record: dict[str, Any], vacuum: np.ndarray | None) -> DeepCDIModel:
    """The model of a stored record: the shipped model of that name if its geometry and training agree, else a
    :class:`StoredModel`."""
    stored = record["model"]
    geometry = ProbeGeometry.from_dict(record["model_geometry"], vacuum)
    name = str(stored.get("name"))
    shipped = load_pretrained(name) if (resources.files(PRETRAINED_PACKAGE) / f"{name}.pt").is_file() else None
    if (shipped is not None and shipped.geometry.to_dict() == geometry.to_dict()
            and shipped.metadata.get("training") == stored.get("training")):
        return shipped
    with torch.device("meta"):
        network = ResUNet(**stored.get("network", {}))
    return StoredModel(network.eval(), geometry, {k: v for k, v in stored.items() if k != "network"})


def constructor_kwargs(record: dict[str, Any], arrays: dict[str, np.ndarray], model=None) -> dict[str, Any]:
    """The arguments that rebuild the stored reconstruction (no datacube, the CPU), from its record and arrays."""
    g, pre, options = record["geometry"], record["preprocessing"], record.get("options", {})
    return {
        "datacube": None,
        "energy": g["energy_eV"],
        "semiangle_cutoff": g["semiangle_cutoff_mrad"],
        "polar_parameters": g["aberrations"],
        "model": model if model is not None else reopened_model(record, arrays.get("model_vacuum_probe_intensity")),
        "device": "cpu",
        "scan_step": options.get("scan_step"),
        "angular_sampling": options.get("angular_sampling"),
        "rotation_deg": options.get("rotation_deg", pre["rotation_deg"]),  # as given (None: estimated again)
        "transpose": options.get("transpose", pre["transpose"]),
        "subsample": pre.get("subsample", 1),
        "vacuum_probe_intensity": arrays.get("vacuum_probe_intensity"),
        "verbose": options.get("verbose", False),
        "repair": pre.get("repair", True),
        "normalise": pre.get("normalise", "pattern"),
        "check_calibration": pre.get("check_calibration", True),
        "storage": "cpu",
        "name": record.get("name", DEFAULT_NAME),
        "rolloff": options.get("rolloff"),
        "initial_scan_positions": arrays.get("initial_scan_positions"),
        "positions_mask": arrays.get("positions_mask"),
    }


def _read_arrays(group) -> dict[str, np.ndarray]:
    """The stored arrays of a node's HDF5 group, by name without the prefix (read as emdfile Arrays)."""
    return {name[len(PREFIX):]: Array.from_h5(group[name]).data for name in group if name.startswith(PREFIX)}


class Storage:
    """emdfile ``Custom`` reading and writing (mixed into ``DeepCDIReconstruction``, itself a ``Custom``)."""

    def set_save_defaults(self, save_patches: bool = False):
        """What :meth:`save` and ``py4DSTEM.save`` write beyond the results: the per-pattern phase patches
        (``save_patches``, default False; J × N × N float32). Returns ``self``."""
        self._save_patches = bool(save_patches)
        return self

    def stored_arrays(self, include_patches: bool | None = None) -> dict[str, np.ndarray]:
        """The arrays a file holds, by name: ``object_phase`` (rad), ``coverage``, ``error_map`` (rad),
        ``positions`` (Å), ``offsets`` (rad), ``probe`` (complex), and when present ``patches`` (rad; with
        ``include_patches``, default :meth:`set_save_defaults`), the vacuum patterns, measured positions (Å) and
        the positions mask."""
        self._require("reconstruct")
        include = getattr(self, "_save_patches", False) if include_patches is None else include_patches
        vacuum = self.vacuum_probe_intensity
        arrays = {
            "object_phase": self.object_phase,
            "coverage": self.coverage,
            "error_map": self.error_map,
            "positions": self.positions,
            "offsets": self.offsets,
            "probe": self.probe,
            "patches": self.patches if include else None,
            "vacuum_probe_intensity": None if vacuum is None else vacuum_pattern(vacuum),
            "model_vacuum_probe_intensity": self.model.geometry.vacuum_probe_intensity,
            "initial_scan_positions": self.initial_scan_positions,
            "positions_mask": self.positions_mask,
        }
        return {name: np.asarray(value) for name, value in arrays.items() if value is not None}

    def _emd_nodes(self) -> dict[str, Node]:
        """The stored arrays as emdfile nodes with their units and axes (the phase maps as calibrated RealSlices)."""
        sampling = self.sampling
        origin = tuple(-self._origin_px * np.asarray(sampling))  # Å (detector frame) of canvas pixel (0, 0)
        units = {"object_phase": "rad", "coverage": "mask pixels", "error_map": "rad", "positions": LENGTH_UNITS,
                 "offsets": "rad", "patches": "rad", "initial_scan_positions": LENGTH_UNITS}
        nodes = {}
        for name, value in self.stored_arrays().items():
            if name in ("object_phase", "coverage", "error_map"):
                nodes[name] = calibrated_slice(value, name, sampling, units[name], origin)
            elif name in ("probe", "patches"):
                half = np.array(value.shape[-2:]) // 2 * np.asarray(sampling)
                axes = [[-half[k], -half[k] + sampling[k]] for k in (0, 1)]
                lead = [None] * (value.ndim - 2)
                nodes[name] = calibrated_array(value, name, units.get(name, ""), dims=[*lead, *axes],
                                               dim_units=[*(["pixels"] * len(lead)), LENGTH_UNITS, LENGTH_UNITS],
                                               dim_names=[*(["pattern"] * len(lead)), "x", "y"])
            else:
                nodes[name] = calibrated_array(value.astype(np.uint8) if value.dtype == bool else value, name,
                                               units.get(name, ""))
        return {PREFIX + name: node for name, node in nodes.items()}

    def _instantiation_metadata(self) -> dict[str, Any]:
        """The constructor's arguments as py4DSTEM's ``instantiation_metadata`` (plain values)."""
        return {
            "energy": self.geometry.energy,
            "semiangle_cutoff": self.geometry.semiangle_cutoff,
            "rolloff": self.geometry.rolloff,
            "model": str(self.model.metadata.get("name", "unnamed")),
            "name": self.name,
            "device": self.device,
            "storage": self.storage,
            "verbose": self.verbose,
            **{k: v for k, v in self._options.items()},
        }

    def to_h5(self, group):
        """Write this reconstruction into an HDF5 group (emdfile's writer calls this; use :meth:`save` or
        ``py4DSTEM.save``). The datacube is not written."""
        self._require("reconstruct")
        self.metadata = Metadata(name="instantiation_metadata", data=self._instantiation_metadata())
        self.metadata = Metadata(name="aberrations_metadata", data=dict(self.geometry.aberrations))
        record = Metadata(name=RECORD_NAME)
        record["json"] = to_json(self.summary())
        self.metadata = record
        nodes = self._emd_nodes()
        hidden = {k: v for k, v in vars(self).items() if isinstance(v, Node) and not isinstance(v, Root)}
        try:
            for name in hidden:  # the datacube (or a DataCube vacuum probe) would be written by Custom.to_h5
                setattr(self, name, None)
            for name, node in nodes.items():
                setattr(self, name, node)
            return Custom.to_h5(self, group)
        finally:
            for name in nodes:
                delattr(self, name)
            for name, value in hidden.items():
                setattr(self, name, value)

    @classmethod
    def _get_constructor_args(cls, group) -> dict[str, Any]:
        record = json.loads(_read_metadata(group, RECORD_NAME)["json"])
        names = ("vacuum_probe_intensity", "model_vacuum_probe_intensity", "initial_scan_positions", "positions_mask")
        arrays = {n: Array.from_h5(group[PREFIX + n]).data for n in names if PREFIX + n in group}
        return constructor_kwargs(record, arrays)

    def _populate_instance(self, group) -> None:
        self._restore(json.loads(_read_metadata(group, RECORD_NAME)["json"]), _read_arrays(group))

    def _restore(self, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Set the results from a stored record and its arrays."""
        coverage = np.asarray(arrays["coverage"], dtype=np.float64)
        self.object_phase = np.where(coverage > 0, arrays["object_phase"], np.nan)  # the NaN policy, old files too
        self.coverage = coverage
        self.error_map = arrays.get("error_map")
        self.offsets = arrays.get("offsets")
        self.patches = arrays.get("patches")
        self._positions = np.asarray(arrays["positions"], dtype=np.float64)
        self._origin_px = np.asarray(record["origin_px"], dtype=np.float64)
        self.stitch_info = dict(record.get("stitching", {}))
        self.probe_source = dict(record.get("probe_source", {"method": "given"}))
        self.timings = dict(record.get("timings", {}))
        self.error = record.get("error_rad")
        self._stored_preprocessing = dict(record["preprocessing"])
        self._options["centre"] = self._stored_preprocessing.get("centre", True)
        self._save_patches = self.patches is not None

    def save(self, path: str | Path, overwrite: bool = False, include_patches: bool | None = None) -> Path:
        """Write this reconstruction as an EMD 1.0 file (the emdfile ``Custom`` node described in
        :mod:`~py4dstem_deepcdi.reconstruction.storage`); ``py4DSTEM.read(path)`` and :func:`read_reconstruction`
        give it back as a ``DeepCDIReconstruction``.

        Atomic; an existing file is kept unless ``overwrite``. ``include_patches`` also stores the per-pattern
        phase patches (default :meth:`set_save_defaults`, False).

        Raises ``RuntimeError`` before ``reconstruct()``, ``FileExistsError`` for an existing ``path`` without
        ``overwrite``, ``OSError`` naming ``path`` when it cannot be written.
        """
        self._require("reconstruct")
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        check_writable(path)
        saved = getattr(self, "_save_patches", False)
        if include_patches is not None:
            self._save_patches = bool(include_patches)
        try:
            return write_nodes(path, {self.name: self}, overwrite=True)
        finally:
            self._save_patches = saved
