"""What the comparison reads from a deep-CDI reconstruction, through its public attributes only.

The comparison never imports :mod:`py4dstem_deepcdi.reconstruction` (the user class imports the comparison):
anything that looks like a :class:`ReconstructionLike` is accepted.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..preprocessing import datacube_array


@runtime_checkable
class ReconstructionLike(Protocol):
    """The public face of a :class:`~py4dstem_deepcdi.DeepCDIReconstruction` that the comparison uses.

    ``datacube`` the raw data; ``data`` the ``PreprocessedData`` (None before ``preprocess()``); ``geometry`` the
    data's ``ProbeGeometry``; ``model`` the ``DeepCDIModel``; ``device``, ``verbose``; ``vacuum_probe_intensity``
    (or None); ``options`` the preprocessing options (dict); ``object_phase`` (rad) and ``coverage`` on the canvas
    (None before ``reconstruct()``); ``positions`` (J, 2) Å and ``positions_px`` (J, 2) canvas pixels; ``sampling``
    (Å per canvas pixel); ``timings`` (s); ``preprocess()``; optionally ``initial_scan_positions`` (measured
    positions, or None) and ``positions_mask`` ((Rx, Ry) bool, or None), which ePIE and the truth then follow.
    """

    datacube: Any
    data: Any
    geometry: Any
    model: Any
    device: str
    verbose: bool
    vacuum_probe_intensity: Any
    object_phase: np.ndarray | None
    timings: dict[str, float]

    @property
    def options(self) -> dict[str, Any]: ...

    def preprocess(self, **overrides) -> Any: ...


def is_reconstruction(obj: Any) -> bool:
    """Whether ``obj`` is a deep-CDI reconstruction (duck typing: it has ``datacube``, ``data``, ``geometry``,
    ``options`` and ``preprocess``), as opposed to a DataCube or an array."""
    return all(hasattr(obj, name) for name in ("datacube", "data", "geometry", "options", "preprocess"))


def subsample_of(recon: ReconstructionLike) -> int:
    """The scan subsampling factor of a reconstruction (every n-th position along both scan axes; default 1)."""
    return int(recon.options.get("subsample", 1) or 1)


def full_scan_shape(recon: ReconstructionLike) -> tuple[int, int]:
    """Scan shape (Rx, Ry) of the reconstruction's raw datacube, before subsampling."""
    shape = datacube_array(recon.datacube).shape
    return int(shape[0]), int(shape[1])


def scan_patterns(recon: ReconstructionLike) -> np.ndarray:
    """The raw patterns (Rx', Ry', Qx, Qy) the reconstruction used: its datacube's array, subsampled as in its
    options (a view, never a copy)."""
    raw = datacube_array(recon.datacube)
    s = subsample_of(recon)
    return raw[::s, ::s] if s > 1 else raw


def used_positions_mask(recon: ReconstructionLike) -> np.ndarray | None:
    """The reconstruction's ``positions_mask`` (Rx, Ry) subsampled as in its options (the positions it used), or
    None when it used every position."""
    mask = getattr(recon, "positions_mask", None)
    if mask is None:
        return None
    s = subsample_of(recon)
    return np.asarray(mask, dtype=bool)[::s, ::s]


def reconstruction_scan(recon: ReconstructionLike) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(positions (J, 2) Å in the detector frame, positions mask of the subsampled scan) that another method must
    use to see the reconstruction's scan: both None for a raster scan of every position, else its own positions
    (measured, or the kept ones) and its mask (or None)."""
    mask = used_positions_mask(recon)
    if getattr(recon, "initial_scan_positions", None) is None and mask is None:
        return None, None
    return np.asarray(recon.positions, dtype=np.float64), mask


def reconstruction_vacuum(recon: ReconstructionLike, detector_shape: tuple[int, int]) -> np.ndarray | None:
    """The vacuum probe intensity that describes the aperture of a reconstruction's data: the user's measured one,
    else the model's if it has the data's detector shape, else None."""
    if recon.vacuum_probe_intensity is not None:
        return recon.vacuum_probe_intensity
    model_vacuum = recon.model.geometry.vacuum_probe_intensity
    if model_vacuum is not None and tuple(model_vacuum.shape) == tuple(detector_shape):
        return model_vacuum
    return None
