"""One fine-tuning run: compose -> validate -> seed -> model + LoRA -> data -> Lightning -> run directory."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_exp import cli
from lora_exp import metrics as M
from lora_exp.config.validate import validate
from lora_exp.errors import RunDirError, UserError
from lora_exp.runs.rundir import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    INITIAL_ADAPTER_DIR,
    METRICS_FILE,
    PID,
    RUN_FILE,
    hydra_overrides,
    read_metrics,
    run_status,
    watch_for_kill,
    write_metrics,
)
from lora_exp.training.distributed import is_global_zero

log = logging.getLogger(__name__)


def run_cli(cfg: DictConfig) -> float | None:
    """Entry point behind ``python -m lora_exp.train``: one clear line and exit code 2 for user errors.

    In a multirun the failing job is recorded and the sweep goes on. ``HYDRA_FULL_ERROR=1`` shows
    the full traceback instead.
    """
    try:
        record = train(cfg)
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


def _sweep_point_failed(cfg: DictConfig, error: BaseException) -> None:
    """Leave a failed sweep point recorded as failed and free its memory for the next point.

    ``train`` records failures once the run has started; a point rejected by ``validate`` is
    recorded here, so a report lists it too. Returns None: an Optuna sweeper marks the trial failed.
    """
    import gc

    from lora_exp.runs.rundir import METRICS_FILE
    from lora_exp.training.loggers import finish_wandb

    finish_wandb(exit_code=1)
    run_dir = Path(cfg.paths.run_dir)
    if not (run_dir / METRICS_FILE).is_file() or read_metrics(run_dir).get(M.STATUS) != M.STATUS_FAILED:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(run_dir, M.STATUS_FAILED, {M.ERROR: f"{type(error).__name__}: {error}"})
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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one fine-tune into ``cfg.paths.run_dir`` and return the flat record written to metrics.json.

    The record's status is ``running`` while it trains, then ``completed``; ``failed`` (with the
    error) or ``interrupted`` if it stops early. What was measured before the stop is kept.
    """
    validate(cfg)
    run_dir = Path(cfg.paths.run_dir)
    previous = _previous_record(cfg, run_dir)
    if previous.get(M.STATUS) == M.STATUS_COMPLETED:  # a resumed sweep skips its finished points
        print(f"lora_exp.train: {run_dir} already completed; resume=true has nothing to do", flush=True)
        return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    # in a multi-process run, ranks > 0 train alongside and leave the run's records to rank 0
    write = write_metrics if is_global_zero() else (lambda _dir, status, values: {**values, M.STATUS: status})
    write(run_dir, M.STATUS_RUNNING, record)
    # marks the run interrupted if this process is killed outright (kill -9, out-of-memory killer)
    watcher = watch_for_kill(run_dir) if is_global_zero() else None
    try:
        report = _train(cfg, run_dir, record, previous, write)
        completed = write(run_dir, M.STATUS_COMPLETED, record)
    except KeyboardInterrupt:
        write(run_dir, M.STATUS_INTERRUPTED, record)
        raise
    except BaseException as e:
        write(run_dir, M.STATUS_FAILED, {**record, M.ERROR: f"{type(e).__name__}: {e}"})
        from lora_exp.training.loggers import finish_wandb

        finish_wandb(exit_code=1)  # the W&B run shows as failed
        raise
    finally:
        from lora_exp.training.loggers import finish_wandb

        finish_wandb()
        if watcher is not None:  # only now, with the final status on disk
            watcher.stdin.close()
            watcher.wait()
    if report:  # after W&B's own closing lines, so the run's summary is the last thing shown
        print(report, flush=True)
    return completed


def _previous_record(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """With ``resume=true``: the run directory's last record, its status as ``run_status`` reads it.

    Refuses to resume a run started with other overrides: its checkpoint would silently continue
    another experiment.
    """
    if not cfg.get("resume") or not (run_dir / METRICS_FILE).is_file():
        return {}
    record = {**read_metrics(run_dir), M.STATUS: run_status(run_dir)}
    if record[M.STATUS] == M.STATUS_RUNNING:
        raise RunDirError(f"{run_dir} is still being trained by process {record.get(PID)}; not resuming it")
    recorded = _recorded_overrides(run_dir)
    now = _comparable_overrides(hydra_overrides()["task"])
    if recorded is not None and recorded != now:
        raise RunDirError(
            f"resume=true in {run_dir}, but the overrides differ from the run's: "
            f"run.json has {recorded}, this command {now}"
        )
    return record


def _recorded_overrides(run_dir: Path) -> list[str] | None:
    import json

    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    return _comparable_overrides(json.loads(path.read_text()).get("overrides") or [])


def _comparable_overrides(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume")


def _train(cfg: DictConfig, run_dir: Path, record: dict[str, Any], previous: dict[str, Any], write) -> str | None:
    """Train and fill ``record``; return the end-of-run summary (None on ranks other than 0)."""
    import hydra
    import lightning as L

    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.model import lora
    from lora_exp.model.load import compile_layers, load_base_model, load_tokenizer, load_unsloth, resolve_model_folder
    from lora_exp.runs import rundir
    from lora_exp.training import distributed, fastpath, resume
    from lora_exp.training.callbacks import Throughput
    from lora_exp.training.loggers import HistoryLogger, wandb_loggers, wandb_record
    from lora_exp.training.module import LoraModule

    started = time.perf_counter()
    _quiet_lightning()
    folder = resolve_model_folder(cfg.model)  # fails fast on gated / offline hub models
    tokenizer = load_tokenizer(folder)
    datamodule = InstructionDataModule(cfg.data, tokenizer, cfg.seed)
    datamodule.setup("fit")  # data problems surface before the weights are loaded
    if cfg.model.get("backend", "hf") == "unsloth":
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        model = load_unsloth(cfg, folder)
    else:
        base = load_base_model(cfg.model, folder, cfg.get("quant"), fsdp=distributed.is_fsdp(cfg.trainer))
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # right before wrapping: LoRA init is seeded
        model = lora.wrap(base, cfg.lora)
        fastpath.install(model, cfg.get("speed"))
    initial_adapter = run_dir / INITIAL_ADAPTER_DIR if lora.mutates_base(cfg.lora) else None
    if initial_adapter and is_global_zero():  # PiSSA / OLoRA: the reference for the final conversion
        lora.save_initial_adapter(model, initial_adapter)
    if cfg.model.get("compile"):
        compile_layers(model)
    model.train()  # from_pretrained leaves the model in eval mode, which would switch LoRA dropout off
    trainable, total = lora.param_counts(model)
    fingerprints = {
        "data_fingerprint": rundir.data_fingerprint(datamodule),
        "model_fingerprint": rundir.model_fingerprint(folder, cfg.model),
        "initial_adapter_sha256": rundir.state_hash((n, p) for n, p in model.named_parameters() if p.requires_grad),
    }
    record.update(
        {
            M.TRAINABLE_PARAMS: trainable,
            M.TOTAL_PARAMS: total,
            M.LORA_SCALING: lora.lora_scaling(cfg.lora),
            "lora/target_modules": lora.resolve_target_modules(cfg.lora.target_modules),
            **datamodule.stats,  # data/*: examples, truncation, padding fraction, fingerprint
        }
    )

    ckpt_path = resume.latest_checkpoint(run_dir / CHECKPOINT_DIR) if previous else None
    if cfg.get("resume"):
        log.info("resuming from %s", ckpt_path) if ckpt_path else log.info("resume=true: no checkpoint, starting anew")
    if is_global_zero():
        rundir.write_run_json(run_dir, cfg, fingerprints)

    module = LoraModule(
        model,
        cfg.optim,
        cfg.loss.chunk_size,
        cfg.loss.get("impl", "chunked"),
        lean_casts=bool((cfg.get("speed") or {}).get("no_input_cast", False)),
    )
    throughput = Throughput()
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [throughput]
    # exact resume (RNG, data position), and a stop before a NaN/inf loss reaches the adapter
    callbacks += [resume.RngState(), resume.RestoreDataPosition(), resume.StopOnNonFiniteLoss()]
    loggers = [_instantiate_logger(c, previous) for c in (cfg.get("logger") or {}).values()]
    history = HistoryLogger(run_dir, append=bool(previous))  # always: reports draw curves and best values from it
    loggers.append(history)
    samples = _sample_generations(loggers, tokenizer, datamodule)
    callbacks += [samples] if samples else []
    record.update(wandb_record(loggers))
    distributed.children_share_run_dir()
    trainer_kwargs = distributed.trainer_kwargs(cfg.trainer)
    if cfg.data.get("packing"):  # packed batches are split across ranks by the data module itself
        trainer_kwargs["use_distributed_sampler"] = False
    trainer = L.Trainer(
        **trainer_kwargs,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        plugins=[resume.AtomicCheckpointIO()],  # a kill during a save never corrupts the latest checkpoint
    )
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["derived"] = {
        k: record[k] for k in (M.TRAINABLE_PARAMS, M.TOTAL_PARAMS, M.LORA_SCALING, "lora/target_modules")
    }
    for logger in loggers:
        logger.log_hyperparams(hparams)

    evaluate = trainer.limit_val_batches != 0
    if ckpt_path:  # the base model was measured before the interruption
        record.update({k: v for k, v in previous.items() if k.startswith(M.BASE_PREFIX)})
    elif evaluate:
        module.metric_prefix = M.BASE_PREFIX
        trainer.validate(module, datamodule=datamodule, verbose=False)
        record.update(module.last_val)
        module.metric_prefix = ""
    write(run_dir, M.STATUS_RUNNING, record)  # base metrics and the W&B run id survive a kill
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except resume.NonFiniteLossError:
        record[M.STOP_REASON] = M.STOP_NON_FINITE_LOSS
        if trainer.is_global_zero:
            _export_last_good_adapter(module, run_dir, initial_adapter)
        raise
    if evaluate and module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if evaluate:
        record.update(module.last_val)
    record.update(distributed.sum_throughput(trainer, throughput.totals()))
    record[M.WORLD_SIZE] = trainer.world_size
    record.update(history.best())
    if history.last(M.TRAIN_LOSS) is not None:
        record[M.TRAIN_LOSS] = history.last(M.TRAIN_LOSS)
    record[M.STEPS] = trainer.global_step
    # FSDP holds shards: gather the full state on every rank (a collective), save it from rank 0
    state = _unprefixed(trainer.strategy.lightning_module_state_dict()) if distributed.is_fsdp(cfg.trainer) else None
    if not trainer.is_global_zero:
        return None
    lora.save_adapter(model, run_dir / ADAPTER_DIR, initial_adapter, state)
    if initial_adapter:
        shutil.rmtree(initial_adapter, ignore_errors=True)
    rundir.update_run_json(run_dir, adapter_sha256=rundir.adapter_hash(run_dir))
    record["time/total_s"] = round(time.perf_counter() - started, 1)
    for wandb_logger in wandb_loggers(loggers):
        rows = samples.rows if samples else None
        wandb_logger.log_run_end({**record, M.STATUS: M.STATUS_COMPLETED}, run_dir / ADAPTER_DIR, rows)
    return summary(record, lora.trainable_params_line(model), run_dir / ADAPTER_DIR)


def _instantiate_logger(logger_cfg, previous: dict[str, Any]):
    """Instantiate a logger; a W&B logger continues the W&B run of the run being resumed."""
    import hydra

    if "wandb" in str(logger_cfg.get("_target_", "")).lower() and previous.get(M.WANDB_RUN_ID):
        return hydra.utils.instantiate(logger_cfg, run_id=previous[M.WANDB_RUN_ID])
    return hydra.utils.instantiate(logger_cfg)


def _export_last_good_adapter(module, run_dir: Path, initial_adapter: Path | None) -> None:
    """After a non-finite loss: save the adapter of the newest checkpoint, reached with finite losses only."""
    import torch

    from lora_exp.model import lora
    from lora_exp.training.resume import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    if ckpt is None:
        log.warning("no checkpoint before the non-finite loss: no adapter saved")
        return
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    if not all(torch.isfinite(t).all() for t in state.values()):
        log.warning("the newest checkpoint already holds non-finite weights: no adapter saved")
        return
    module.load_state_dict(state, strict=False)
    lora.save_adapter(module.model, run_dir / ADAPTER_DIR, initial_adapter)
    log.warning("saved the adapter of the last good checkpoint (%s) to %s", ckpt.name, run_dir / ADAPTER_DIR)


def _unprefixed(state_dict: dict) -> dict:
    """The LightningModule's state dict keyed as the PEFT model's own (without ``model.``)."""
    return {k.removeprefix("model."): v for k, v in state_dict.items()}


def _sample_generations(loggers: list, tokenizer, datamodule):
    """A callback generating replies to the first held-out prompts, when a W&B logger wants them."""
    from lora_exp.training.loggers import SampleGenerations, wandb_loggers

    wanted = max((lg.num_samples for lg in wandb_loggers(loggers)), default=0)
    if wanted <= 0:
        return None
    try:  # the held-out records as chat examples, rendered exactly as the data module renders them
        from lora_exp.data import formats

        _, val = datamodule.load_records()
        fields = formats.field_names(datamodule.cfg.get("fields"))
        examples = [formats.convert(r, datamodule.format, fields) for r in val[:wanted]]
        examples = [e for e in examples if e.get("messages") and e["messages"][-1]["role"] == "assistant"]
        renderer = getattr(datamodule, "renderer", None)
        render = renderer.render_prompt if renderer is not None else None
    except Exception as e:  # samples are a courtesy: never a reason to fail the run
        log.warning("no sample generations: %s: %s", type(e).__name__, e)
        return None
    max_new_tokens = max(lg.max_new_tokens for lg in wandb_loggers(loggers))
    return SampleGenerations(tokenizer, examples, max_new_tokens, render)


def _quiet_lightning() -> None:
    """Let Hydra's job logging (console + run directory log file) print Lightning's messages once."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def summary(record: dict[str, Any], params_line: str, adapter: Path) -> str:
    """The short end-of-run report: PEFT's parameter line, held-out metrics before -> after, the adapter."""
    lines = ["", "=" * 64, params_line]
    rows = [k for k in M.VAL_METRICS if k in record]
    if rows:
        lines.append(f"{'held-out':<18}{'base':>12}    {'after':>12}")
        for k in rows:
            before = record.get(M.base(k))
            lines.append(f"{k:<18}{_fmt(before):>12} -> {_fmt(record[k]):>12}")
    lines.append(
        f"trained {record.get(M.STEPS, 0)} steps on {record.get(M.TRAIN_TOKENS, 0):,} real tokens "
        f"at {record.get(M.TRAIN_TOKENS_PER_S, 0):.0f} tokens/s; run took {record.get('time/total_s', 0):.0f} s"
    )
    lines.append(f"adapter: {adapter}")
    lines.append("=" * 64)
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
