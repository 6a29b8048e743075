"""One fine-tuning run: compose -> validate -> seed -> model + LoRA -> data -> Lightning -> run directory.

:func:`train` owns the run directory (lock, status, the end of the run: completed, failed,
interrupted); :class:`Recipe` is the training itself, in named steps as a torchtune recipe is:
``build_model`` -> ``describe_run`` -> ``build_trainer`` -> ``fit`` -> ``save``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_exp import cli
from lora_exp import metrics as M
from lora_exp.config.validate import validate
from lora_exp.errors import ConfigError, RunDirError, UserError
from lora_exp.model import precision
from lora_exp.runs import lock, provenance
from lora_exp.runs.rundir import RunDir, RunRecord, as_disk_error
from lora_exp.training.distributed import is_global_zero
from lora_exp.training.resume import GracefulStop, RunInterrupted

log = logging.getLogger(__name__)


def run_cli(cfg: DictConfig) -> float | None:
    """Entry point behind ``python -m lora_exp.train``: one clear line and exit code 2 for user errors.

    In a multirun the failing job is recorded and the sweep goes on (the sweep then exits 1 and
    lists its failed points). SIGTERM / SIGINT exit 143 / 130, a sweep included.
    ``HYDRA_FULL_ERROR=1`` shows the full traceback instead.
    """
    start_job()
    try:
        record = train(cfg)
    except RunInterrupted as e:
        print(f"lora_exp.train: {e}; continue with the same command and resume=true", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not _is_multirun():
            cli.fail("train", e)
        print(f"lora_exp.train: error: {e}", file=sys.stderr, flush=True)
        return _sweep_point_failed(cfg, e)
    except Exception as e:  # an out-of-memory or a bug in one sweep point must not stop the others
        if not _is_multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.exception("sweep point failed: %s", cfg.paths.run_dir)
        print(f"lora_exp.train: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return _sweep_point_failed(cfg, e)
    return record.get(cfg.get("optimized_metric") or M.VAL_LOSS)


def start_job() -> None:
    """What a job does before anything else: secrets out of Hydra's files, an empty ``WANDB_MODE`` unset."""
    from lora_exp.runs.secrets import redact_hydra_files

    redact_hydra_files()
    if os.environ.get("WANDB_MODE", None) == "":  # `WANDB_MODE=` means "not set", as for any shell variable
        del os.environ["WANDB_MODE"]


def _sweep_point_failed(cfg: DictConfig, error: BaseException) -> None:
    """Leave a failed sweep point recorded as failed and free its memory for the next point.

    ``train`` records failures once the run has started; a point rejected by ``validate`` is
    recorded here, so a report lists it too. A point refused because its directory belongs to
    another run is not touched. Returns None: an Optuna sweeper marks the trial failed.
    """
    import gc

    from lora_exp.runs.guard import RunDirTaken
    from lora_exp.training.loggers import finish_wandb

    finish_wandb(exit_code=1)
    run = RunDir(cfg.paths.run_dir)
    if not isinstance(error, (RunDirTaken, lock.RunDirLocked)):
        try:
            if not run.metrics_file.is_file() or run.metrics().get(M.STATUS) != M.STATUS_FAILED:
                run.path.mkdir(parents=True, exist_ok=True)
                RunRecord(run).write(M.STATUS_FAILED, **{M.ERROR: f"{type(error).__name__}: {error}"})
        except (OSError, ValueError):
            pass  # the disk refuses: the error line already said why
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return None


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _check_trains(cfg: DictConfig) -> None:
    """A run that would take no optimizer step would leave an untrained adapter marked completed."""
    problems = [
        f"trainer.{key}=0: the run would not train; use python -m lora_exp.evaluate to measure a model"
        for key in ("max_steps", "max_epochs")
        if OmegaConf.select(cfg, f"trainer.{key}") == 0
    ]
    if problems:
        raise ConfigError(problems)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one fine-tune into ``cfg.paths.run_dir`` and return the flat record written to metrics.json.

    The record's status is ``running`` while it trains, then ``completed``; ``failed`` (with the
    error) or ``interrupted`` if it stops early. What was measured before the stop is kept.
    """
    validate(cfg)
    _check_trains(cfg)
    choices = precision.resolve(cfg)  # `auto` precision / attention / loss for this device, once
    print(choices.line(), flush=True)
    run = RunDir(cfg.paths.run_dir)
    if is_global_zero():
        _take_run_dir(cfg, run)
    previous = _previous_record(cfg, run)
    if previous.get(M.STATUS) == M.STATUS_COMPLETED:  # a resumed sweep skips its finished points
        print(f"lora_exp.train: {run.path} already completed; resume=true has nothing to do", flush=True)
        return previous
    # in a multi-process run, ranks > 0 train alongside and leave the run's records to rank 0
    record = RunRecord(run, writes=is_global_zero())
    record.update(choices.record())
    stop = GracefulStop(run.last_checkpoint).install()
    watcher = None
    try:
        record.write(M.STATUS_RUNNING)
        # marks the run interrupted if this process is killed outright (kill -9, out-of-memory killer)
        watcher = _watch(run)
        from lora_exp.training.recipe import Recipe

        report = Recipe(cfg, run, record, previous, stop).train()
        completed = record.write(M.STATUS_COMPLETED)
    except RunInterrupted as e:
        record.write_quietly(M.STATUS_INTERRUPTED, **{M.STOP_REASON: e.signal_name, M.ERROR: str(e)})
        raise
    except BaseException as e:
        disk = as_disk_error(e)
        record.write_quietly(M.STATUS_FAILED, **{M.ERROR: str(disk) if disk else f"{type(e).__name__}: {e}"})
        from lora_exp.training.loggers import finish_wandb

        finish_wandb(exit_code=1)  # the W&B run shows as failed
        if disk is not None:
            raise disk from e
        raise
    finally:
        _end_run(run, stop, watcher)
    if report:  # after W&B's own closing lines, so the run's summary is the last thing shown
        print(report, flush=True)
    return completed


def _take_run_dir(cfg: DictConfig, run: RunDir) -> None:
    """Lock the run directory; refuse one that holds another run's results (see ``runs.guard``).

    Under ``python -m lora_exp.train`` the Hydra callback made these checks before Hydra wrote
    anything; here they are the last line of defence (a config without the callback).
    """
    from lora_exp.runs.guard import check_run_dir

    if not lock.holds(run.path):
        check_run_dir(run.path, bool(cfg.get("resume")), overwrite=False)
        lock.acquire(run.path)


def _watch(run: RunDir):
    from lora_exp.runs.watcher import watch_for_kill

    return watch_for_kill(run.path) if is_global_zero() else None


def _end_run(run: RunDir, stop: GracefulStop, watcher) -> None:
    from lora_exp.training.loggers import finish_wandb

    finish_wandb()
    stop.uninstall()
    if watcher is not None:  # only now, with the final status on disk
        watcher.stdin.close()
        watcher.wait()
    lock.release(run.path)


def _previous_record(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """With ``resume=true``: the run directory's last record, its status as ``run_status`` reads it.

    Refuses to resume a run started with other overrides: its checkpoint would silently continue
    another experiment. Only a longer ``trainer.max_steps`` / ``max_epochs`` is allowed, and a
    completed run then trains on (``lora_exp.config.overrides.check_resume``).
    """
    if not cfg.get("resume") or not run.metrics_file.is_file():
        return {}
    record = {**run.metrics(), M.STATUS: run.status()}
    if record[M.STATUS] == M.STATUS_RUNNING and not lock.holds(run.path):
        raise RunDirError(f"{run.path} is still being trained by process {record.get('pid')}; not resuming it")
    recorded = _recorded_overrides(run)
    now = _comparable_overrides(provenance.hydra_overrides()["task"])
    if recorded is not None and recorded != now:  # refused, unless only the training length grew
        from lora_exp.config.overrides import check_resume

        return check_resume(record, recorded, now, run.path, cfg)
    return record


def _recorded_overrides(run: RunDir) -> list[str] | None:
    if not run.run_file.is_file():
        return None
    return _comparable_overrides(run.run_json().get("overrides") or [])


def _comparable_overrides(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume")
