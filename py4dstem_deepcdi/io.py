"""Files: atomic writes, EMD 1.0 files through py4DSTEM/emdfile."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import emdfile
import numpy as np
import py4DSTEM


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    A crash or an exception never leaves a half-written ``path`` (the rename is atomic on one file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers such as h5py and py4DSTEM.save want to create the file themselves
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure to ``path`` atomically (format from the suffix, default PNG), ``dpi`` default 120."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


RESULT_NAME = "deepcdi_phase"
METADATA_NAME = "deepcdi"


def save_result(
    path: str | Path,
    phase,
    metadata: dict,
    arrays: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a phase image (rad) with JSON-able ``metadata`` and named child ``arrays`` as an EMD 1.0 file.

    The root is a py4DSTEM ``RealSlice`` named ``deepcdi_phase`` (so ``py4DSTEM.read`` opens it with or without
    this package), its metadata group ``deepcdi`` holds the JSON text, and every array in ``arrays`` becomes a
    child ``Array`` node. Written to a temporary file and renamed: never a half-written file; an existing file
    is kept unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    root = py4DSTEM.RealSlice(data=np.asarray(phase, dtype=np.float32), name=RESULT_NAME)
    md = emdfile.Metadata(name=METADATA_NAME)
    md["json"] = json.dumps(metadata, default=_json_default)
    root.metadata = md
    for name, value in (arrays or {}).items():
        root.add_to_tree(emdfile.Array(data=np.asarray(value), name=name))
    with atomic_path(path) as tmp:
        py4DSTEM.save(str(tmp), root, mode="w")
    return path


def read_result(path: str | Path) -> tuple:
    """Read a file written by :func:`save_result`: ``(phase, metadata dict, arrays dict)``.

    Raises ``ValueError`` for a file that is not such a result (corrupt, foreign, another EMD file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        root = py4DSTEM.read(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable EMD file (corrupt or another format): {exc}") from exc
    if getattr(root, "name", None) != RESULT_NAME or METADATA_NAME not in getattr(root, "metadata", {}):
        raise ValueError(f"{path} is an EMD file but not a py4dstem-deepcdi result (no '{RESULT_NAME}' node)")
    metadata = json.loads(root.metadata[METADATA_NAME]["json"])
    arrays = {name: root.tree(name).data for name in root.treekeys}
    return root.data, metadata, arrays


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in the metadata")
