"""One fine-tuning run: compose -> validate -> seed -> model + LoRA -> data -> Lightning -> run directory."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_exp import metrics as M
from lora_exp.config import validate
from lora_exp.errors import UserError
from lora_exp.rundir import ADAPTER_DIR, read_metrics, write_metrics

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
        print(f"lora_exp.train: error: {e}", file=sys.stderr, flush=True)
        if _is_multirun():
            return _sweep_point_failed(cfg, e)
        sys.exit(2)
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

    from lora_exp.loggers import finish_wandb
    from lora_exp.rundir import METRICS_FILE

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
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    write_metrics(run_dir, M.STATUS_RUNNING, record)
    try:
        _train(cfg, run_dir, record)
    except KeyboardInterrupt:
        write_metrics(run_dir, M.STATUS_INTERRUPTED, record)
        raise
    except BaseException as e:
        write_metrics(run_dir, M.STATUS_FAILED, {**record, M.ERROR: f"{type(e).__name__}: {e}"})
        from lora_exp.loggers import finish_wandb

        finish_wandb(exit_code=1)  # the W&B run shows as failed
        raise
    finally:
        from lora_exp.loggers import finish_wandb

        finish_wandb()
    return write_metrics(run_dir, M.STATUS_COMPLETED, record)


def _train(cfg: DictConfig, run_dir: Path, record: dict[str, Any]) -> None:
    import hydra
    import lightning as L

    from lora_exp import lora
    from lora_exp.callbacks import Throughput
    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.loggers import HistoryLogger, wandb_loggers, wandb_record
    from lora_exp.models import load_base_model, load_tokenizer, resolve_model_folder
    from lora_exp.module import LoraModule

    started = time.perf_counter()
    _quiet_lightning()
    folder = resolve_model_folder(cfg.model)  # fails fast on gated / offline hub models
    tokenizer = load_tokenizer(folder)
    datamodule = InstructionDataModule(cfg.data, tokenizer, cfg.seed)
    datamodule.setup("fit")  # data problems surface before the weights are loaded
    base = load_base_model(cfg.model, folder)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # right before wrapping: LoRA init is seeded
    model = lora.wrap(base, cfg.lora)
    model.train()  # from_pretrained leaves the model in eval mode, which would switch LoRA dropout off
    trainable, total = lora.param_counts(model)
    record.update(
        {
            M.TRAINABLE_PARAMS: trainable,
            M.TOTAL_PARAMS: total,
            M.LORA_SCALING: lora.lora_scaling(cfg.lora),
            "lora/target_modules": lora.resolve_target_modules(cfg.lora.target_modules),
            **datamodule.stats,  # data/*: examples, truncation, padding fraction, fingerprint
        }
    )

    module = LoraModule(model, cfg.optim, cfg.loss.chunk_size, cfg.loss.get("impl", "chunked"))
    throughput = Throughput()
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [throughput]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    history = HistoryLogger(run_dir)  # always: reports draw curves and best values from it
    loggers.append(history)
    samples = _sample_generations(loggers, tokenizer, datamodule)
    callbacks += [samples] if samples else []
    record.update(wandb_record(loggers))
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
    )
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["derived"] = {
        k: record[k] for k in (M.TRAINABLE_PARAMS, M.TOTAL_PARAMS, M.LORA_SCALING, "lora/target_modules")
    }
    for logger in loggers:
        logger.log_hyperparams(hparams)

    evaluate = trainer.limit_val_batches != 0
    if evaluate:
        module.metric_prefix = M.BASE_PREFIX
        trainer.validate(module, datamodule=datamodule, verbose=False)
        record.update(module.last_val)
        module.metric_prefix = ""
    trainer.fit(module, datamodule=datamodule)
    if evaluate and module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if evaluate:
        record.update(module.last_val)
    record.update(throughput.totals())
    record.update(history.best())
    if history.last(M.TRAIN_LOSS) is not None:
        record[M.TRAIN_LOSS] = history.last(M.TRAIN_LOSS)
    record[M.STEPS] = trainer.global_step
    model.save_pretrained(run_dir / ADAPTER_DIR)
    record["time/total_s"] = round(time.perf_counter() - started, 1)
    for wandb_logger in wandb_loggers(loggers):
        rows = samples.rows if samples else None
        wandb_logger.log_run_end({**record, M.STATUS: M.STATUS_COMPLETED}, run_dir / ADAPTER_DIR, rows)
    print(summary(record, lora.trainable_params_line(model), run_dir / ADAPTER_DIR), flush=True)


def _sample_generations(loggers: list, tokenizer, datamodule):
    """A callback generating replies to the first held-out prompts, when a W&B logger wants them."""
    from lora_exp.loggers import SampleGenerations, wandb_loggers

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
        render = (lambda m: renderer._apply(m, add_generation_prompt=True)) if hasattr(renderer, "_apply") else None
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
