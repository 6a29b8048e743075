"""Run-directory ownership checks, made before Hydra writes anything, and the sweep's exit status.

Hydra writes ``.hydra/`` (the config, the overrides) into the run directory before the task
function runs, so a check made by the task comes too late to keep a finished run intact.
:class:`RunDirGuard` is a Hydra callback (``conf/hydra/default.yaml``) that runs first:

- a directory in use by a live process stops the new run at once, naming the holder;
- a directory holding a finished run (or any trained state) is refused unless ``resume=true``
  (continue, or skip a completed run: Hydra then leaves its ``.hydra/`` as it was) or
  ``overwrite=true`` (the old run is moved aside to ``DIR.old-<time>``; nothing is mixed);
- at the end of a sweep, every failed point is listed and the exit status is non-zero.

:func:`check_run_dir` is the same check for the task itself (the last line of defence when the
callback is not configured, e.g. a config loaded with ``--config-path``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lora_exp import metrics as M
from lora_exp.errors import RunDirError
from lora_exp.runs import lock
from lora_exp.runs.rundir import RunDir, as_disk_error, find_run_dirs


class RunDirTaken(RunDirError):
    """The run directory holds another run's results; nothing was written to it."""


def _flags(cfg: DictConfig) -> tuple[bool, bool]:
    resume, overwrite = bool(cfg.get("resume", False)), bool(cfg.get("overwrite", False))
    if resume and overwrite:
        raise RunDirError("resume=true and overwrite=true contradict each other: pick one")
    return resume, overwrite


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``path.old-<time>`` (same file system: one atomic step); return the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
    path.rename(target)
    return target


def check_run_dir(path: Path, resume: bool, overwrite: bool) -> str:
    """Decide what a new run may do with ``path``: ``new``, ``resume`` or ``moved`` (the old run moved aside).

    Raises:
        RunDirTaken: ``path`` holds results and neither ``resume`` nor ``overwrite`` was given.
        RunDirLocked: a live process trains in ``path``.
    """
    run = RunDir(path)
    holder = lock.live_holder(run.path)
    if holder is not None:
        raise lock.RunDirLocked(f"{run.path} is in use by {lock.describe(holder)}; wait for it or pick another dir")
    if not run.is_run():
        return "new"
    if overwrite:
        moved = move_aside(run.path)
        print(f"lora_exp.train: overwrite=true: moved the previous run {run.path} to {moved}", flush=True)
        return "moved"
    if resume:
        return "resume"
    if run.has_results():
        raise RunDirTaken(
            f"{run.path} already holds a run (status {run.status()!r}); nothing was written to it. "
            f"Pass resume=true to continue it (a completed run is skipped), overwrite=true to move it "
            f"aside to {run.path.name}.old-<time> and start over, or pick another hydra.run.dir"
        )
    return "new"  # a run that stopped before training (a config error): nothing to keep


def _fail(error: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    error = as_disk_error(error) or error  # a read-only or full disk: one line naming the path
    print(f"lora_exp.train: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def _is_child_rank() -> bool:
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


class RunDirGuard(Callback):
    """Hydra callback: ownership checks before Hydra writes, failed-point summary after a sweep."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _is_child_rank() or config.hydra.output_subdir is None:
            return
        try:
            resume, overwrite = _flags(config)
            path = Path(str(OmegaConf.select(config, "hydra.run.dir"))).resolve()
            action = check_run_dir(path, resume, overwrite)
            lock.acquire(path)  # held until this process exits; the task finds it its own
        except (RunDirError, OSError) as e:
            _fail(e)
            return
        if action == "resume" and RunDir(path).config_file.is_file():
            # the run's own .hydra/ stays: a refused or skipped resume must not rewrite it
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _is_child_rank():
            return
        try:
            resume, overwrite = _flags(config)
            sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).resolve()
            runs = [RunDir(p) for p in find_run_dirs(sweep_dir)]
            busy = [(r, h) for r in runs if (h := lock.live_holder(r.path)) is not None]
            if busy:
                raise lock.RunDirLocked(
                    f"sweep {sweep_dir}: {busy[0][0].path} is in use by {lock.describe(busy[0][1])}"
                )
            finished = [r for r in runs if r.has_results()]
            if finished and overwrite:
                moved = move_aside(sweep_dir)
                print(f"lora_exp.train: overwrite=true: moved the previous sweep {sweep_dir} to {moved}", flush=True)
            elif finished and not resume:
                raise RunDirTaken(
                    f"sweep directory {sweep_dir} already holds {len(finished)} run(s) with results; nothing was "
                    f"written. Pass resume=true to continue the sweep (completed points are skipped), "
                    f"overwrite=true to move it aside, or pick another hydra.sweep.dir"
                )
        except (RunDirError, OSError) as e:
            _fail(e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _is_child_rank():
            return
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        failed = failed_points(sweep_dir)
        if not failed:
            return
        print(f"lora_exp.train: {len(failed)} sweep point(s) failed:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(1)


def failed_points(sweep_dir: Path) -> list[str]:
    """One line per point of a sweep that did not complete: its directory, status and error."""
    lines = []
    for path in find_run_dirs(sweep_dir):
        run = RunDir(path)
        status = run.status()
        if status in (M.STATUS_COMPLETED, None):
            continue
        try:
            error = str(run.metrics().get(M.ERROR) or "").splitlines()[0][:300]
        except (OSError, ValueError, IndexError):
            error = ""
        overrides = " ".join(run.overrides())
        lines.append(f"{path}: {status}" + (f" [{overrides}]" if overrides else "") + (f": {error}" if error else ""))
    return lines
