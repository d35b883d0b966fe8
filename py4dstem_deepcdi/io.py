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


def save_json(path: str | Path, value: Any, indent: int | None = 1) -> Path:
    """Write ``value`` as JSON text to ``path`` atomically (numpy arrays and scalars, paths as JSON values)."""
    path = Path(path)
    text = json.dumps(value, indent=indent, default=_json_default)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
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
