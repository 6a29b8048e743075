"""A run directory: its layout (spelled here once), its records, and :class:`RunDir` to read it.

Every command that reads or writes a run directory goes through this module: ``train`` writes it
(through :class:`RunRecord`), ``evaluate``, ``generate``, ``export``, ``reproduce`` and ``resume``
read it through :class:`RunDir`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lora_exp import metrics as M
from lora_exp.errors import RunDirError
from lora_exp.runs.secrets import SECRET_ENV  # noqa: F401  (its old home; the policy lives in runs.secrets)

METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
FREEZE_FILE = "pip-freeze.txt"
HISTORY_FILE = "history.jsonl"  # every logged metric, one JSON line per logging call
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # method=full: the whole fine-tuned model, a plain HF folder (weights + tokenizer)
INITIAL_ADAPTER_DIR = "initial_adapter"  # PiSSA / OLoRA: the adapter before training, removed at the end
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
HYDRA_DIR = ".hydra"
LOCK_FILE = ".lock"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PID = "pid"  # metrics.json: the process writing a `running` record

# errors of a full, read-only or forbidden disk: reported as one line naming the path, not a traceback
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


class DiskError(RunDirError):
    """A write failed for lack of space or permission: the message names the path."""


# how libraries that wrap the OS error (safetensors' Rust writer, torch's zip writer) spell it
_DISK_MESSAGES = {
    "no space left on device": errno.ENOSPC,
    "storagefull": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "read-only file system": errno.EROFS,
    "readonlyfilesystem": errno.EROFS,
    "os error 30": errno.EROFS,
    "permission denied": errno.EACCES,
    "os error 13": errno.EACCES,
    "disk quota exceeded": errno.EDQUOT,
}


def as_disk_error(error: BaseException, path: Path | str | None = None) -> DiskError | None:
    """``error`` as a one-line :class:`DiskError` naming the path when it is a disk fault; else None.

    ``path`` (what the user knows: the checkpoint, the adapter folder) wins over the temporary file
    the error may name.
    """
    if isinstance(error, DiskError):
        return error
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        code, where = error.errno, path or error.filename
    elif isinstance(error, (RuntimeError, OSError)) or type(error).__name__ == "SafetensorError":
        text = str(error).lower().replace(" ", "").replace("-", "")
        code = next((c for m, c in _DISK_MESSAGES.items() if m.replace(" ", "").replace("-", "") in text), None)
        where = path or getattr(error, "filename", None)
        if code is None:
            return None
    else:
        return None
    return DiskError(f"cannot write {where or 'the run directory'}: {os.strerror(code)}")


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: a reader never sees half a file; a failed write leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_metrics(run_dir: Path, status: str, values: dict[str, Any]) -> dict[str, Any]:
    """Record ``values`` and the run ``status`` in ``run_dir/metrics.json``.

    A ``running`` record also names the writing process, so a reader can tell a live run from one
    that was killed (see :func:`run_status`).
    """
    data = {**{k: v for k, v in values.items() if k != PID}, M.STATUS: status}
    if status == M.STATUS_RUNNING:
        data[PID] = os.getpid()
    write_json(Path(run_dir) / METRICS_FILE, data)
    return data


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def run_status(run_dir: Path) -> str | None:
    """The run's status, with a ``running`` record whose process is gone read as ``interrupted``.

    None when the directory holds no readable ``metrics.json``.
    """
    try:
        record = read_metrics(run_dir)
    except (OSError, ValueError):
        return None
    status = record.get(M.STATUS)
    if status == M.STATUS_RUNNING and not pid_alive(record.get(PID)):
        return M.STATUS_INTERRUPTED
    return status


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as dead)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process not yet reaped by its parent is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class RunDir:
    """One run directory: where each record lies, and readers for them.

    Readers of optional records (history, overrides, group choices) return empty values when the
    record is absent; ``metrics`` and ``config`` raise ``OSError`` / ``ValueError`` like the files do.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    # ------------------------------------------------------------------ layout
    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def adapter_config_file(self) -> Path:
        return self.adapter / ADAPTER_CONFIG

    @property
    def model(self) -> Path:
        """A full fine-tune's trained model (``method=full``), in place of ``adapter/``."""
        return self.path / MODEL_DIR

    @property
    def initial_adapter(self) -> Path:
        return self.path / INITIAL_ADAPTER_DIR

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def freeze_file(self) -> Path:
        return self.path / FREEZE_FILE

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def hydra_dir(self) -> Path:
        return self.path / HYDRA_DIR

    @property
    def config_file(self) -> Path:
        return self.hydra_dir / "config.yaml"

    @property
    def hydra_file(self) -> Path:
        return self.hydra_dir / "hydra.yaml"

    @property
    def overrides_file(self) -> Path:
        return self.hydra_dir / "overrides.yaml"

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    # ------------------------------------------------------------------ records
    def metrics(self) -> dict[str, Any]:
        return read_metrics(self.path)

    def status(self) -> str | None:
        """``metrics.json``'s status (a dead ``running`` process reads as ``interrupted``); None if unreadable."""
        return run_status(self.path)

    def run_json(self) -> dict[str, Any]:
        """``run.json``, or {} when it is missing or unreadable."""
        try:
            return json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return {}

    def config(self):
        """The run's config as it ran: ``run.json``'s (``auto`` precision resolved for its device), else
        ``.hydra/config.yaml`` as Hydra saved it (a run stopped before it wrote ``run.json``)."""
        from omegaconf import OmegaConf

        recorded = self.path / RUN_FILE
        if recorded.is_file():
            try:
                config = json.loads(recorded.read_text()).get("config")
            except (OSError, ValueError):
                config = None
            if isinstance(config, dict):
                return OmegaConf.create(config)
        return OmegaConf.load(self.config_file)

    @cached_property
    def _hydra(self):
        from omegaconf import OmegaConf

        return OmegaConf.load(self.hydra_file) if self.hydra_file.is_file() else None

    def group_choices(self) -> dict[str, Any]:
        """Config-group options the run picked (``{"data": "json_extract", ...}``); {} if not recorded."""
        from omegaconf import OmegaConf

        if self._hydra is None:
            return {}
        return OmegaConf.to_container(OmegaConf.select(self._hydra, "hydra.runtime.choices") or {}) or {}

    def group_choice(self, group: str) -> str | None:
        return self.group_choices().get(group)

    def overrides(self) -> list[str]:
        """The command-line overrides of the run (``.hydra/overrides.yaml``, else ``run.json``)."""
        from omegaconf import OmegaConf

        if self.overrides_file.is_file():
            return [str(o) for o in OmegaConf.load(self.overrides_file) or []]
        return [str(o) for o in self.run_json().get("overrides") or []]

    def history(self) -> list[dict[str, Any]]:
        """Every row of ``history.jsonl``; a torn last line (a kill mid-write) is skipped."""
        rows = []
        try:
            lines = self.history_file.read_text().splitlines()
        except OSError:
            return rows
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    def adapter_sha256(self) -> str | None:
        """SHA-256 of the saved adapter weights file; None when there is none."""
        for name in ADAPTER_WEIGHTS:
            if (self.adapter / name).is_file():
                return sha256_file(self.adapter / name)
        return None

    # ------------------------------------------------------------------ questions
    def is_run(self) -> bool:
        """Whether a training run has written here (a run record or a saved config)."""
        return self.metrics_file.is_file() or self.run_file.is_file() or self.config_file.is_file()

    def has_results(self) -> bool:
        """Whether the directory holds something a new run must not overwrite.

        A completed run, or any trained state (checkpoints, adapter). A run that failed before
        training (a config error) holds nothing of value.
        """
        if self.status() == M.STATUS_COMPLETED or self.adapter.is_dir() or self.model.is_dir():
            return True
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.ckpt"))

    def has_adapter(self) -> bool:
        return self.adapter_config_file.is_file()

    def has_model(self) -> bool:
        """Whether a full fine-tune saved its model here (``model/config.json``)."""
        return (self.model / "config.json").is_file()


def find_run_dirs(path: Path) -> list[Path]:
    """Run directories at or below ``path`` (a run directory holds ``metrics.json`` or ``.hydra/config.yaml``)."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [path] if RunDir(path).is_run() else []
    for marker in (METRICS_FILE, f"{HYDRA_DIR}/config.yaml"):
        found += [p.parent if marker == METRICS_FILE else p.parent.parent for p in path.rglob(marker)]
    return sorted(set(found))


class RunRecord(dict):
    """The run's flat record (``metrics.json``): metric values plus the status written with them.

    Only the process that owns the run's records writes (global rank 0); on other ranks
    :meth:`write` only returns what rank 0 writes.
    """

    def __init__(self, run: RunDir, writes: bool = True):
        super().__init__()
        self.run = run
        self.writes = writes

    def write(self, status: str, **extra: Any) -> dict[str, Any]:
        """Write the record with ``status`` (and ``extra`` keys, e.g. ``error``); return what was written."""
        values = {**self, **extra}
        if not self.writes:
            return {**values, M.STATUS: status}
        return write_metrics(self.run.path, status, values)

    def write_quietly(self, status: str, **extra: Any) -> dict[str, Any]:
        """:meth:`write` on the way out of a failure: a disk that refuses the write must not hide the cause."""
        try:
            return self.write(status, **extra)
        except OSError:
            return {**self, **extra, M.STATUS: status}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
