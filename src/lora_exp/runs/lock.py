"""Run-directory ownership: one process at a time trains in a directory.

The lock is a file, ``DIR/.lock``, created exclusively (``O_CREAT | O_EXCL``) and holding the
owner's pid and host. It is removed when the process exits; a lock whose process is gone (same
host, dead pid) is stale and taken over. A lock held by a live process, or by a process on
another host (which cannot be checked from here), stops the second run at once.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from lora_exp.errors import RunDirError
from lora_exp.runs.rundir import LOCK_FILE, pid_alive

_held: dict[Path, Path] = {}  # run directory -> lock file, for the locks this process holds


class RunDirLocked(RunDirError):
    """Another live process trains in this run directory."""


def _holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def describe(holder: dict) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since', '?')})"


def acquire(run_dir: Path) -> Path:
    """Take the lock of ``run_dir`` (created if missing); idempotent within one process.

    Raises:
        RunDirLocked: another live process holds it.
        OSError: the directory cannot be written (a full or read-only disk).
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return _held[run_dir]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is None:  # being written this instant, or torn by a crash: look again
                time.sleep(0.2)
                holder = _holder(lock)
            if holder is not None and not _stale(holder):
                raise RunDirLocked(
                    f"{run_dir} is in use by {describe(holder)}; wait for it to finish, or pick another "
                    f"hydra.run.dir (if that process is gone, delete {lock})"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        try:
            os.write(fd, json.dumps(me).encode())
        except BaseException:
            os.close(fd)
            lock.unlink(missing_ok=True)
            raise
        os.close(fd)
        _held[run_dir] = lock
        return lock
    raise RunDirLocked(f"{run_dir}: could not take {lock} (another process keeps creating it)")


def _stale(holder: dict) -> bool:
    """A lock of this host whose process is gone; another host's lock is never judged stale."""
    return holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid"))


def release(run_dir: Path) -> None:
    """Remove this process's lock of ``run_dir`` (if it holds it)."""
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is not None and (_holder(lock) or {}).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def holds(run_dir: Path) -> bool:
    return Path(run_dir).resolve() in _held


@atexit.register
def _release_all() -> None:
    for run_dir in list(_held):
        try:
            release(run_dir)
        except OSError:
            pass


def live_holder(run_dir: Path) -> dict | None:
    """The holder of ``run_dir``'s lock when it is another live process (or another host); else None."""
    lock = Path(run_dir) / LOCK_FILE
    holder = _holder(lock) if lock.is_file() else None
    if holder is None or _stale(holder):
        return None
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return None
    return holder
