"""Files: atomic writes that leave nothing behind (errors, SIGTERM, a killed writer), output checks before any
computation, input/output identity through links."""

import errno
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from py4dstem_deepcdi import io
from py4dstem_deepcdi.io import (
    Terminated,
    atomic_path,
    check_outputs,
    check_writable,
    remove_stale_parts,
    same_file,
    save_json,
)

ROOT = Path(__file__).resolve().parents[1]

#: a writer that announces its temporary file and then waits to be signalled
WRITER = """
import sys, time
from py4dstem_deepcdi.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half a file")
    print(tmp, flush=True)
    time.sleep(60)
"""


def parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_atomic_path_removes_the_temporary_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_text("new, half")
        raise ZeroDivisionError
    assert target.read_text() == "old" and parts(tmp_path) == []
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and parts(tmp_path) == []


def test_sigterm_inside_a_write_raises_and_cleans_up(tmp_path):
    """SIGTERM raises Terminated (exit status 143) in the main thread: the temporary file goes, the target is never
    written, and the default action comes back after the block."""
    target = tmp_path / "out.txt"
    with pytest.raises(Terminated) as caught, atomic_path(target) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
    assert caught.value.code == 143
    assert not target.exists() and parts(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _start_writer(target: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env, stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_terminated_and_killed_writers_leave_nothing_behind(tmp_path):
    """A writer process ended by SIGTERM removes its temporary file itself; one ended by SIGKILL cannot, and the next
    write to the same path removes it (a live writer's file is kept)."""
    (termed, tmp_a), (killed, tmp_b) = _start_writer(tmp_path / "a.h5"), _start_writer(tmp_path / "b.h5")
    assert tmp_a.exists() and tmp_b.exists() and tmp_a.name.startswith(f".a.h5.{termed.pid}.")
    termed.send_signal(signal.SIGTERM)
    killed.send_signal(signal.SIGKILL)
    assert termed.wait(30) == 128 + signal.SIGTERM and killed.wait(30) == -signal.SIGKILL
    assert not tmp_a.exists() and not (tmp_path / "a.h5").exists()
    assert tmp_b.exists() and not (tmp_path / "b.h5").exists()  # orphaned by the kill
    live = tmp_path / f".b.h5.{os.getpid()}.abcdefgh.part"  # a concurrent live writer's
    live.write_text("in progress")
    with atomic_path(tmp_path / "b.h5") as tmp:
        tmp.write_text("whole")
    assert (tmp_path / "b.h5").read_text() == "whole"
    assert parts(tmp_path) == [live.name]


def test_stale_parts_without_a_process_id_expire(tmp_path):
    old, new = tmp_path / ".x.h5.abcdefgh.part", tmp_path / ".x.h5.ijklmnop.part"
    other = tmp_path / ".x.h5.history.json.1.abcdefgh.part"  # another file's: never touched
    for path in (old, new, other):
        path.write_text("")
    past = time.time() - 2 * io.STALE_PART_SECONDS
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    assert remove_stale_parts(tmp_path / "x.h5") == [old]
    assert parts(tmp_path) == sorted([new.name, other.name])


def test_write_errors_name_the_path(tmp_path):
    """An OSError while writing (full disk) names the target, not the hidden temporary file; an error about another
    file passes through unchanged."""
    target = tmp_path / "out.h5"
    full = rf"cannot write {target}: No space left on device \(the disk is full\)"
    with pytest.raises(OSError, match=full) as caught, atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC and parts(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="elsewhere"), atomic_path(target):
        open(tmp_path / "elsewhere")  # noqa: SIM115


def test_check_writable_before_any_computation(tmp_path, monkeypatch):
    assert check_writable(tmp_path / "new" / "deeper" / "out.h5") == tmp_path / "new" / "deeper" / "out.h5"
    assert not (tmp_path / "new").exists()  # only checked, created when written
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"cannot write {tmp_path / 'file' / 'out.h5'}"):
        check_writable(tmp_path / "file" / "out.h5")
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        check_writable(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1024))  # a full disk
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'out.h5'}: only 0.0 MiB free") as caught:
        check_writable(tmp_path / "out.h5")
    assert caught.value.errno == errno.ENOSPC
    assert parts(tmp_path) == []


def test_check_writable_refuses_a_read_only_folder():
    target = Path("/sys/deepcdi-test-output.h5")  # /sys refuses new files, even to root
    try:
        check_writable(target)
    except PermissionError as exc:
        assert str(exc).startswith(f"[Errno {errno.EACCES}] cannot write {target}: Permission denied")
        return
    pytest.skip("no read-only folder here")


def test_same_file_through_links_and_relative_paths(tmp_path, monkeypatch):
    data = tmp_path / "data.h5"
    data.write_text("x")
    (tmp_path / "link.h5").symlink_to(data)
    os.link(data, tmp_path / "hard.h5")
    monkeypatch.chdir(tmp_path)
    assert same_file("link.h5", data) and same_file("hard.h5", data) and same_file("./sub/../data.h5", data)
    assert not same_file("other.h5", data)
    assert same_file("new.h5", tmp_path / "new.h5")  # neither exists yet


def test_check_outputs_never_overwrites_an_input(tmp_path):
    data = tmp_path / "data.h5"
    data.write_text("input")
    (tmp_path / "link.h5").symlink_to(data)
    with pytest.raises(ValueError, match="--output .*link.h5 is the input file .*refusing to overwrite an input"):
        check_outputs({"--output": tmp_path / "link.h5"}, {"input": data}, overwrite=True)
    with pytest.raises(ValueError, match="--output and --png name the same file"):
        check_outputs({"--output": tmp_path / "a.h5", "--png": tmp_path / "a.h5"}, {}, overwrite=True)
    (tmp_path / "out.h5").write_text("old")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        check_outputs({"--output": tmp_path / "out.h5", "--png": None}, {"input": data}, overwrite=False)
    check_outputs({"--output": tmp_path / "out.h5"}, {"input": data, "--model": None}, overwrite=True)
    assert data.read_text() == "input"


def test_save_json_is_atomic(tmp_path):
    path = save_json(tmp_path / "h.json", [{"step": 1}])
    assert path.read_text().startswith("[")
    with pytest.raises(TypeError):
        save_json(path, [object()])  # fails before the file is touched
    assert path.read_text().startswith("[") and parts(tmp_path) == []
