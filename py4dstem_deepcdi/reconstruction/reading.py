"""Reopening a reconstruction file: :func:`read_reconstruction` (this format and the one of versions <= 0.1)."""

from __future__ import annotations

from pathlib import Path

from emdfile import Node, Root

from ..io import read_node, read_result_nodes
from .core import DeepCDIReconstruction
from .results import KIND
from .storage import DEFAULT_NAME, constructor_kwargs


def _legacy(cls, path: Path, model=None):
    """A reconstruction from a file of versions <= 0.1 (a ``deepcdi_phase`` RealSlice with JSON metadata)."""
    image, record, children, _ = read_result_nodes(path)
    if record.get("kind") != KIND:
        raise ValueError(f"{path} holds a py4dstem-deepcdi result of kind {record.get('kind')!r}, not a reconstruction")
    names = {"positions_A": "positions", "offsets_rad": "offsets", "coverage": "coverage", "patches_rad": "patches"}
    arrays = {names[name]: node.data for name, node in children.items() if name in names}
    arrays["object_phase"] = image.data
    record = {**record, "name": DEFAULT_NAME, "format_version": 1}
    recon = cls(**constructor_kwargs(record, arrays, model))
    recon._restore(record, arrays)
    return recon


def read_reconstruction(path: str | Path, datacube=None, model=None):
    """Reopen a reconstruction written by :meth:`DeepCDIReconstruction.save` or ``py4DSTEM.save`` (or a file of
    versions <= 0.1): a :class:`~py4dstem_deepcdi.DeepCDIReconstruction` with its results, options, model geometry
    and calibrations, ready to ``visualize()``; with ``datacube`` (the raw data) also to be compared with ePIE again,
    and with ``model`` (its weights) to be reconstructed again.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a file that holds no reconstruction.
    """
    cls = DeepCDIReconstruction
    found = read_node(path)
    if isinstance(found, Root):
        candidates = [found.tree(name) for name in found.treekeys]
        found = next((node for node in candidates if isinstance(node, cls)), found)
    if isinstance(found, cls):
        recon = found.attach_model(model) if model is not None else found
    elif isinstance(found, Node) and getattr(found, "name", None) == "deepcdi_phase":
        recon = _legacy(cls, Path(path), model)
    else:
        raise ValueError(f"{path} is an EMD file but not a py4dstem-deepcdi result (it holds a {type(found).__name__})")
    return recon.attach_datacube(datacube) if datacube is not None else recon
