"""Files: atomic writes, output checks made before any computation, EMD 1.0 files through py4DSTEM/emdfile.

Every file is written to a hidden temporary ``.NAME.PID.XXXXXXXX.part`` beside it and renamed onto ``NAME`` when
complete (:func:`atomic_path`): an exception, Ctrl-C or SIGTERM removes the temporary file; one left by a killed
process (SIGKILL, power loss) is removed by the next write to the same path (:func:`remove_stale_parts`).
An ``OSError`` while writing (unwritable folder, full disk) is raised again with a message naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import emdfile
import numpy as np
import py4DSTEM

PART_SUFFIX = ".part"
#: a temporary file that names no process id (written before they did) is stale after this many seconds
STALE_PART_SECONDS = 3600.0
#: free space (bytes) below which a disk counts as full before anything is computed
MIN_FREE_BYTES = 16 * 2**20
_RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkstemp's random part


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM inside :func:`terminate_raises` (exit status 128 + 15 = 143)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread, so ``finally`` clauses (temporary
    files) run before the process ends with status 143.

    Changes nothing in another thread or when the program has its own SIGTERM handler; the default action is
    restored on leaving the block.
    """
    mine = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if mine:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when that cannot be told, e.g. on Windows)."""
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def remove_stale_parts(path: str | Path) -> list[Path]:
    """Remove the temporary files of earlier writes to ``path`` whose process has ended (killed mid-write).

    A temporary file ``.NAME.PID.XXXXXXXX.part`` is stale when process PID no longer runs on this machine; one
    without a process id (``.NAME.XXXXXXXX.part``) when older than ``STALE_PART_SECONDS``. Files of live writers
    are kept. Returns the removed paths.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?{_RANDOM}{re.escape(PART_SUFFIX)}")
    removed = []
    with contextlib.suppress(OSError):
        for part in path.parent.iterdir():
            match = pattern.fullmatch(part.name)
            if match is None:
                continue
            with contextlib.suppress(OSError):
                if match[1] is not None:
                    stale = not _process_alive(int(match[1]))
                else:
                    stale = time.time() - part.stat().st_mtime > STALE_PART_SECONDS
                if stale:
                    part.unlink()
                    removed.append(part)
    return removed


def output_error(path: str | Path, exc: OSError, what: str = "write") -> OSError:
    """An ``OSError`` of the same kind (errno) as ``exc`` whose message names ``path`` and the reason."""
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (disk quota exceeded)"}.get(exc.errno, "")
    message = f"cannot {what} {path}: {reason}{hint}"
    return OSError(exc.errno, message) if exc.errno else OSError(message)


def _temporary(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=PART_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def check_writable(path: str | Path, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Check, before any computation, that ``path`` can be written; returns it as a Path.

    The nearest existing folder on the way to ``path`` (missing ones are created when writing) must be a folder in
    which a file can be created, ``path`` must not be a folder, and the disk must have ``min_free_bytes`` free
    (default ``MIN_FREE_BYTES``, 16 MiB: "not obviously full"). Whether ``path`` may be replaced is the caller's
    question.

    Raises
    ------
    OSError
        (``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``, errno ``ENOSPC``) naming ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a folder")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write {path}: {folder} is not a folder")
    try:
        _temporary(folder / path.name).unlink()
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise output_error(path, exc) from exc
    if free < min_free_bytes:
        raise OSError(
            errno.ENOSPC,
            f"cannot write {path}: only {free / 2**20:.1f} MiB free on its disk, {min_free_bytes / 2**20:.0f} MiB "
            "needed (the disk is full)",
        )
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (through symbolic links, relative paths and hard links)."""
    a, b = Path(a), Path(b)
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_outputs(
    outputs: dict[str, str | Path | None],
    inputs: dict[str, str | Path | None],
    overwrite: bool,
    hint: str = "pass --overwrite to replace it",
) -> None:
    """Check the files a command will write before it computes anything.

    ``outputs`` and ``inputs`` map a flag (for the messages) to a path (None: not given). No output may be an
    input (through symbolic links and relative paths) or another output; an existing output needs ``overwrite``
    (``hint`` says how to give it); every output's folder must be writable with free space (:func:`check_writable`).

    Raises
    ------
    ValueError
        An output that is an input or another output.
    FileExistsError
        An existing output without ``overwrite``.
    OSError
        An output that cannot be written (naming it).
    """
    given = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    sources = {flag: Path(path) for flag, path in inputs.items() if path is not None}
    for i, (flag, path) in enumerate(given.items()):
        for other, source in sources.items():
            if same_file(path, source):
                raise ValueError(f"{flag} {path} is the {other} file {source}: refusing to overwrite an input")
        for other, second in list(given.items())[i + 1 :]:
            if same_file(path, second):
                raise ValueError(f"{flag} and {other} name the same file {path}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; {hint}")
        check_writable(path)


def _names_another_file(exc: OSError, *paths: Path) -> bool:
    return exc.filename is not None and str(exc.filename) not in {str(p) for p in paths}


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    A crash or an exception never leaves a half-written ``path`` (the rename is atomic on one file system). The
    temporary file is removed on any exception, Ctrl-C and SIGTERM (:func:`terminate_raises`); stale ones of killed
    earlier writes are removed first (:func:`remove_stale_parts`). Missing parent folders are created.

    Raises
    ------
    OSError
        Naming ``path`` (not the temporary file) when it cannot be written (unwritable folder, full disk).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(path)
        tmp = _temporary(path)
    except OSError as exc:
        raise output_error(path, exc) from exc
    tmp.unlink()  # writers such as h5py and py4DSTEM.save want to create the file themselves
    with terminate_raises():
        try:
            yield tmp
            os.replace(tmp, path)
        except OSError as exc:
            if _names_another_file(exc, tmp, path):
                raise
            raise output_error(path, exc) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure to ``path`` atomically (format from the suffix, default PNG), ``dpi`` default 120."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def to_json(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON text (numpy arrays and scalars, paths as JSON values)."""
    return json.dumps(value, indent=indent, default=_json_default)


def save_json(path: str | Path, value: Any, indent: int | None = 1) -> Path:
    """Write ``value`` as JSON text to ``path`` atomically (numpy arrays and scalars, paths as JSON values)."""
    path = Path(path)
    text = json.dumps(value, indent=indent, default=_json_default)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


RESULT_NAME = "deepcdi_phase"
METADATA_NAME = "deepcdi"
#: units written for the pixels of a calibrated image's axes (py4DSTEM's spelling of Å)
LENGTH_UNITS = "A"


def calibrated_slice(
    data, name: str, sampling: tuple[float, float], units: str = "rad", origin_A: tuple[float, float] = (0.0, 0.0)
) -> py4DSTEM.RealSlice:
    """A py4DSTEM ``RealSlice`` of a 2-D image calibrated in Å: ``units`` for its values (default ``"rad"``), axis
    dims ``origin_A + pixel × sampling`` Å named ``x``, ``y``, and its root calibration's R pixel size ``sampling``
    (Å). The array is stored as given (float32 for real values).

    py4DSTEM 0.14 reads a RealSlice back with units ``"intensity"`` and pixel dims: :func:`restore_calibration`
    puts the stored ones back.
    """
    array = np.asarray(data)
    node = py4DSTEM.RealSlice(data=array if np.iscomplexobj(array) else array.astype(np.float32), name=name)
    node.units = units
    for axis, label in enumerate(("x", "y")):
        start = float(origin_A[axis])
        node.set_dim(axis, [start, start + float(sampling[axis])], units=LENGTH_UNITS, name=label)
    node.calibration.set_R_pixel_size(float(sampling[0]))
    node.calibration.set_R_pixel_units(LENGTH_UNITS)
    return node


def calibrated_array(data, name: str, units: str = "", dims: list | None = None, dim_units: list | None = None,
                     dim_names: list | None = None) -> emdfile.Array:
    """An emdfile ``Array`` with ``units`` for its values and, per axis, a dim vector (a step, ``[first, second]``
    or the whole axis, see emdfile), its units and name; unnamed axes are pixel indices."""
    return emdfile.Array(data=np.asarray(data), name=name, units=units, dims=dims, dim_units=dim_units,
                         dim_names=dim_names)


def restore_calibration(node, group) -> Any:
    """Put the value units and dim vectors stored in the HDF5 ``group`` of an array node back on ``node`` (py4DSTEM's
    ``RealSlice`` forgets them when read); returns ``node``."""
    stored = emdfile.Array._get_constructor_args(group)
    node.units = stored["units"]
    for axis, dim in enumerate(stored["dims"]):
        node.set_dim(axis, dim, units=stored["dim_units"][axis], name=stored["dim_names"][axis])
    return node


@contextlib.contextmanager
def _adopted(root, nodes: dict[str, Any]) -> Iterator[Any]:
    """Within the block, the ``nodes`` (name → emdfile Node) are children of ``root`` under those names; their own
    names and trees (e.g. the root an earlier ``py4DSTEM.save`` gave them) are restored on leaving."""
    saved = [(node, node.name, node._root, node._treepath) for node in nodes.values()]
    try:
        for name, node in nodes.items():
            node._root, node.name = None, name
            root.add_to_tree(node)
        yield root
    finally:
        for node, name, old_root, treepath in saved:
            root._branch._dict.pop(node.name, None)
            node.name, node._root, node._treepath = name, old_root, treepath


def write_nodes(path: str | Path, nodes: dict[str, Any], root=None, overwrite: bool = False) -> Path:
    """Write emdfile nodes (name → Node: an Array, a py4DSTEM object, any emdfile ``Custom``) side by side under one
    root as an EMD 1.0 file, atomically.

    ``root`` is an emdfile ``Root`` (default a new one named after the first node + ``_root``) whose metadata (e.g.
    a py4DSTEM calibration) and children are written too. The nodes keep their names and trees. ``py4DSTEM.read``
    returns the node itself when the root holds one, else the root (its children by name: ``root.tree(name)``).

    Raises
    ------
    FileExistsError
        ``path`` exists and not ``overwrite``.
    OSError
        Naming ``path``, when it cannot be written (checked before anything is written).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    check_writable(path)
    root = root if root is not None else emdfile.Root(name=f"{next(iter(nodes), 'deepcdi')}_root")
    with _adopted(root, nodes), atomic_path(path) as tmp:
        emdfile.save(str(tmp), root, mode="w")
    return path


def save_result(
    path: str | Path,
    phase,
    metadata: dict,
    arrays: dict | None = None,
    overwrite: bool = False,
    sampling: tuple[float, float] | None = None,
    nodes: dict[str, Any] | None = None,
    root_name: str | None = None,
) -> Path:
    """Write a phase image (rad) with JSON-able ``metadata`` and named child ``arrays`` as an EMD 1.0 file.

    The image is a py4DSTEM ``RealSlice`` named ``deepcdi_phase`` (so ``py4DSTEM.read`` opens it with or without
    this package), calibrated with ``sampling`` (Å per pixel; rad values, :func:`calibrated_slice`) when given;
    its metadata group ``deepcdi`` holds the JSON text, and every entry of ``arrays`` (an array or an emdfile
    ``Array`` with its own dims and units) becomes a child node. ``nodes`` (name → emdfile Node) are written beside
    it under the same root, named ``root_name`` (default ``deepcdi_phase_root``; ``py4DSTEM.read`` then returns
    the root, ``py4DSTEM.read(path, datapath="ROOT/NAME")`` one node). Written to a temporary file and renamed:
    never a half-written file; an existing file is kept unless ``overwrite``.

    Raises
    ------
    FileExistsError
        ``path`` exists and not ``overwrite``.
    OSError
        Naming ``path``, when it cannot be written (checked before the file is built, :func:`check_writable`).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    check_writable(path)
    if sampling is not None:
        image = calibrated_slice(phase, RESULT_NAME, sampling)
    else:
        image = py4DSTEM.RealSlice(data=np.asarray(phase, dtype=np.float32), name=RESULT_NAME)
    md = emdfile.Metadata(name=METADATA_NAME)
    md["json"] = json.dumps(metadata, default=_json_default)
    image.metadata = md
    for name, value in (arrays or {}).items():
        child = value if isinstance(value, emdfile.Node) else emdfile.Array(data=np.asarray(value), name=name)
        child.name = name
        image.add_to_tree(child)
    if root_name:
        image.root.name = root_name
    if nodes:
        return write_nodes(path, nodes, root=image.root, overwrite=True)
    with atomic_path(path) as tmp:
        py4DSTEM.save(str(tmp), image, mode="w")
    return path


def read_node(path: str | Path) -> Any:
    """What ``py4DSTEM.read`` finds in ``path`` (a node, or the root of several).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that is not a readable EMD file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return py4DSTEM.read(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable EMD file (corrupt or another format): {exc}") from exc


def read_result_nodes(path: str | Path) -> tuple[Any, dict, dict[str, Any], dict[str, Any]]:
    """Read a file written by :func:`save_result`: ``(image node, metadata dict, child nodes by name, nodes beside
    the image by name)``.

    Raises ``ValueError`` for a file that is not such a result (corrupt, foreign, another EMD file).
    """
    found = read_node(path)
    beside: dict[str, Any] = {}
    if isinstance(found, emdfile.Root) and RESULT_NAME in found.treekeys:
        beside = {name: found.tree(name) for name in found.treekeys if name != RESULT_NAME}
        found = found.tree(RESULT_NAME)
    if getattr(found, "name", None) != RESULT_NAME or METADATA_NAME not in getattr(found, "metadata", {}):
        raise ValueError(
            f"{path} is an EMD file but not a py4dstem-deepcdi result (no '{RESULT_NAME}' node; it holds a "
            f"{type(found).__name__})"
        )
    metadata = json.loads(found.metadata[METADATA_NAME]["json"])
    return found, metadata, {name: found.tree(name) for name in found.treekeys}, beside


def read_result(path: str | Path) -> tuple:
    """Read a file written by :func:`save_result`: ``(phase, metadata dict, arrays dict)``.

    Raises ``ValueError`` for a file that is not such a result (corrupt, foreign, another EMD file).
    """
    image, metadata, children, _ = read_result_nodes(path)
    return image.data, metadata, {name: node.data for name, node in children.items()}


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in the metadata")
