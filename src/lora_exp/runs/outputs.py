"""Output folders of commands (``export out=``, ``report --out``, ``paper --out``): never delete others' files.

:func:`safe_output_dir` is the one rule: an output folder may not be, or contain, a run directory;
an existing non-empty folder is replaced only with ``overwrite`` and only when it holds the
command's own marker file (written by its previous output). :func:`replace_dir` then swaps a
finished temporary folder in, so a failure leaves either the old output or the new one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from lora_exp.errors import RunDirError
from lora_exp.runs.rundir import as_disk_error, find_run_dirs


class OutputDirError(RunDirError):
    """An output folder that the command may not write (a run directory, or not its own output)."""


def safe_output_dir(path: Path | str, marker: str, overwrite: bool, option: str = "out") -> Path:
    """Check that a command may write its output to ``path``; return it resolved.

    Args:
        path: the output folder.
        marker: the file name the command writes into every output folder of its own.
        overwrite: the user allowed replacing a previous output of this command.
        option: how the user spelled the option, for the message (``out``, ``--out``).

    Raises:
        OutputDirError: ``path`` is or contains a run directory, is a file, or holds something
            other than this command's previous output, or is non-empty without ``overwrite``.
    """
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{option}={path} is a file, not a folder")
    runs = find_run_dirs(path)
    if runs:
        where = "is" if runs[0] == path else "contains"
        raise OutputDirError(f"{option}={path} {where} a run directory ({runs[0]}); pick a folder of its own")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not (path / marker).is_file():
        raise OutputDirError(
            f"{option}={path} exists and holds files this command did not write (no {marker}); "
            f"it is never replaced, even with overwrite=true: pick another folder"
        )
    if not overwrite:
        raise OutputDirError(f"{option}={path} holds a previous output; pass overwrite=true to replace it")
    return path


def replace_dir(new: Path, path: Path) -> None:
    """Put the finished folder ``new`` at ``path``, removing a previous output there only once ``new`` is in place."""
    new, path = Path(new), Path(path)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    try:
        new.rename(path)
    except BaseException:
        if old is not None:
            old.rename(path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary folder beside ``path``, then swap it in.

    A full disk or a crash never leaves half a folder: the previous ``path`` stays until the new
    one is complete, the temporary folder is removed on failure, and a disk fault becomes one
    clear error naming ``path``.
    """
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        disk = as_disk_error(e, path)
        if disk is not None:
            raise disk from e
        raise
