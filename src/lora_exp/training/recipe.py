"""The training recipe of one run, in named steps as a torchtune recipe is.

``build_model`` -> ``describe_run`` -> ``build_trainer`` -> ``fit`` -> ``save``; each step leaves
what the next needs on the :class:`Recipe`. The run directory's ownership and the run's end
(completed, failed, interrupted) belong to :func:`lora_exp.training.run.train`, which calls it.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_exp import metrics as M
from lora_exp.runs import provenance
from lora_exp.runs.rundir import RunDir, RunRecord
from lora_exp.training import full
from lora_exp.training.distributed import is_global_zero
from lora_exp.training.resume import GracefulStop, RunInterrupted

log = logging.getLogger(__name__)


class Recipe:
    """The training of one run, step by step; each step leaves what the next needs on ``self``."""

    def __init__(self, cfg: DictConfig, run: RunDir, record: RunRecord, previous: dict[str, Any], stop: GracefulStop):
        self.cfg, self.run, self.record, self.previous, self.stop = cfg, run, record, previous, stop
        self.started = time.perf_counter()
        self.ckpt_path: Path | None = None
        self.full = full.is_full(cfg)  # method=full: every weight trained, saved as RUN/model/

    def train(self) -> str | None:
        """Train and fill the record; return the end-of-run summary (None on ranks other than 0)."""
        _quiet_lightning()
        self.build_model()
        self.stop.check()
        self.describe_run()
        self.build_trainer()
        self.stop.check()
        self.fit()
        return self.save()

    def build_model(self) -> None:
        """Tokenizer, data (checked before weights load), base model, LoRA wrap, seeded right before it."""
        import lightning as L

        from lora_exp.data.datamodule import InstructionDataModule
        from lora_exp.model import lora
        from lora_exp.model.load import (
            compile_layers,
            load_base_model,
            load_tokenizer,
            load_unsloth,
            resolve_model_folder,
        )
        from lora_exp.training import distributed, fastpath

        cfg = self.cfg
        self.folder = resolve_model_folder(cfg.model)  # fails fast on gated / offline hub models
        self.tokenizer = load_tokenizer(self.folder)
        self.datamodule = InstructionDataModule(cfg.data, self.tokenizer, cfg.seed)
        self.datamodule.flash_attn_kwargs = cfg.model.get("attn_implementation") == "flash_attention_2"
        self.datamodule.setup("fit")  # data problems surface before the weights are loaded
        self.stop.check()
        if cfg.model.get("backend", "hf") == "unsloth":
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            model = load_unsloth(cfg, self.folder)
        else:
            base = load_base_model(cfg.model, self.folder, cfg.get("quant"), fsdp=distributed.is_fsdp(cfg.trainer))
            L.seed_everything(cfg.seed, workers=True, verbose=False)  # right before wrapping: LoRA init is seeded
            if self.full:
                model = base
                full.train_every_weight(model)
            else:
                model = lora.wrap(base, cfg.lora)
            fastpath.install(model, cfg.get("speed"))
        mutates = not self.full and lora.mutates_base(cfg.lora)
        self.initial_adapter = self.run.initial_adapter if mutates else None
        if self.initial_adapter and is_global_zero():  # PiSSA / OLoRA: the reference for the final conversion
            lora.save_initial_adapter(model, self.initial_adapter)
        if cfg.model.get("compile"):
            compile_layers(model)
        model.train()  # from_pretrained leaves the model in eval mode, which would switch LoRA dropout off
        self.model = model

    def describe_run(self) -> None:
        """Parameter counts and data statistics into the record; ``run.json`` with the fingerprints."""
        from lora_exp.model import lora
        from lora_exp.training import resume

        cfg, model = self.cfg, self.model
        trainable, total = full.param_counts(model) if self.full else lora.param_counts(model)
        self.record.update(
            {
                "method": full.method(cfg),
                M.TRAINABLE_PARAMS: trainable,
                M.TOTAL_PARAMS: total,
                **self.datamodule.stats,  # data/*: examples, truncation, padding fraction, fingerprint
            }
        )
        if not self.full:  # a full fine-tune has no adapter: no scaling, no target modules
            self.record[M.LORA_SCALING] = lora.lora_scaling(cfg.lora)
            self.record["lora/target_modules"] = lora.resolve_target_modules(cfg.lora.target_modules)
        if self.previous:
            self.ckpt_path = resume.latest_checkpoint(self.run.checkpoints)
            if self.ckpt_path:
                log.info("resuming from %s", self.ckpt_path)
            else:  # every checkpoint is missing or unreadable: the work done so far is lost
                log.warning("resume=true: no readable checkpoint in %s; training starts anew", self.run.checkpoints)
        elif self.cfg.get("resume"):
            log.info("resume=true: no previous run in %s, starting anew", self.run.path)
        if is_global_zero():
            fingerprints = {
                "data_fingerprint": provenance.data_fingerprint(self.datamodule),
                "model_fingerprint": provenance.model_fingerprint(self.folder, cfg.model),
                "initial_adapter_sha256": provenance.state_hash(
                    (n, p) for n, p in model.named_parameters() if p.requires_grad
                ),
            }
            provenance.write_run_json(self.run.path, cfg, fingerprints)

    def build_trainer(self) -> None:
        """The Lightning module, callbacks, loggers (``history.jsonl`` always) and the ``Trainer``."""
        import hydra
        import lightning as L

        from lora_exp.training import distributed, resume
        from lora_exp.training.callbacks import Throughput
        from lora_exp.training.history import HistoryLogger
        from lora_exp.training.loggers import wandb_record
        from lora_exp.training.module import LoraModule
        from lora_exp.training.selection import SelectCheckpoint, early_stopping

        cfg = self.cfg
        self.module = LoraModule(
            self.model,
            cfg.optim,
            cfg.loss.chunk_size,
            cfg.loss.get("impl", "chunked"),
            lean_casts=bool((cfg.get("speed") or {}).get("no_input_cast", False)),
        )
        self.throughput = Throughput()
        metric = str(cfg.get("optimized_metric") or M.VAL_LOSS)
        self.selection = SelectCheckpoint(metric, str((cfg.get("checkpoint") or {}).get("select") or "last"))
        callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [self.throughput]
        callbacks += [self.selection] + [c for c in [early_stopping(cfg, metric)] if c is not None]
        # exact resume (RNG, data position), a stop before a NaN/inf loss reaches the adapter, signals
        callbacks += [resume.RngState(), resume.RestoreDataPosition(), resume.StopOnNonFiniteLoss(), self.stop]
        self.loggers = [_instantiate_logger(c, self.previous) for c in (cfg.get("logger") or {}).values()]
        # always: reports draw curves and best values from it; rows are kept only with the checkpoint they belong to
        self.history = HistoryLogger(self.run.path, append=self.ckpt_path is not None)
        self.loggers.append(self.history)
        self.samples = _sample_generations(self.loggers, self.tokenizer, self.datamodule)
        callbacks += [self.samples] if self.samples else []
        self.record.update(wandb_record(self.loggers))
        distributed.children_share_run_dir()
        trainer_kwargs = distributed.trainer_kwargs(cfg.trainer)
        if cfg.data.get("packing"):  # packed batches are split across ranks by the data module itself
            trainer_kwargs["use_distributed_sampler"] = False
        self.trainer = L.Trainer(
            **trainer_kwargs,
            callbacks=callbacks,
            logger=self.loggers or False,
            default_root_dir=str(self.run.path),
            plugins=[resume.AtomicCheckpointIO()],  # a kill during a save never corrupts the latest checkpoint
        )
        hparams = OmegaConf.to_container(cfg, resolve=True)
        derived = ("method", M.TRAINABLE_PARAMS, M.TOTAL_PARAMS, M.LORA_SCALING, "lora/target_modules")
        hparams["derived"] = {k: self.record[k] for k in derived if k in self.record}
        for logger in self.loggers:
            logger.log_hyperparams(hparams)

    def fit(self) -> None:
        """Measure the base (unless resumed), train, measure the adapter; metrics into the record."""
        from lora_exp.training import distributed, resume

        trainer, module, datamodule, record = self.trainer, self.module, self.datamodule, self.record
        evaluate = trainer.limit_val_batches != 0
        if self.ckpt_path:  # the base model was measured before the interruption
            record.update({k: v for k, v in self.previous.items() if k.startswith(M.BASE_PREFIX)})
        elif evaluate:
            module.metric_prefix = M.BASE_PREFIX
            trainer.validate(module, datamodule=datamodule, verbose=False)
            record.update(module.last_val)
            module.metric_prefix = ""
        record.write(M.STATUS_RUNNING)  # base metrics and the W&B run id survive a kill
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=self.ckpt_path, weights_only=True)
        except resume.NonFiniteLossError:
            record[M.STOP_REASON] = M.STOP_NON_FINITE_LOSS
            if trainer.is_global_zero:
                _export_last_good_adapter(module, self.run, self.initial_adapter, self.tokenizer if self.full else None)
            raise
        except RunInterrupted:
            record[M.STEPS] = trainer.global_step
            raise
        self.stop.check()  # a signal during the last step's hooks
        if evaluate and module.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
            self.selection.consider(module, trainer.global_step)  # the final step is a candidate too
        if evaluate:
            record.update(module.last_val)
        # checkpoint.select=best: the best validation's weights go to adapter/, with its metrics
        record.update(self.selection.record(trainer.global_step, module.last_val if evaluate else {}))
        if self.selection.restore_best(module) and self.selection.best_step != trainer.global_step:
            log.info(
                "checkpoint.select=best: adapter/ holds step %d (%s %.4f); the last step was %d",
                self.selection.best_step,
                self.selection.metric,
                self.selection.best_value,
                trainer.global_step,
            )
        record.update(distributed.sum_throughput(trainer, self.throughput.totals()))
        record[M.WORLD_SIZE] = trainer.world_size
        record.update(self.history.best())
        if self.history.last(M.TRAIN_LOSS) is not None:
            record[M.TRAIN_LOSS] = self.history.last(M.TRAIN_LOSS)
        record[M.STEPS] = trainer.global_step

    def save(self) -> str | None:
        """The adapter (atomically: a failed save leaves the previous one), its hash, the W&B run end."""
        from lora_exp.model import lora
        from lora_exp.training import distributed
        from lora_exp.training.loggers import wandb_loggers

        trainer, record = self.trainer, self.record
        # FSDP holds shards: gather the full state on every rank (a collective), save it from rank 0
        fsdp = distributed.is_fsdp(self.cfg.trainer)
        state = _unprefixed(trainer.strategy.lightning_module_state_dict()) if fsdp else None
        if not trainer.is_global_zero:
            return None
        if self.full:  # method=full: the whole model as a plain HF folder, RUN/model/
            full.save_model_atomically(self.model, self.tokenizer, self.run, state)
            provenance.update_run_json(self.run.path, model_sha256=full.model_sha256(self.run.model))
        else:
            save_adapter_atomically(self.model, self.run, self.initial_adapter, state)
            if self.initial_adapter:
                shutil.rmtree(self.initial_adapter, ignore_errors=True)
            provenance.update_run_json(self.run.path, adapter_sha256=self.run.adapter_sha256())
        record["time/total_s"] = round(time.perf_counter() - self.started, 1)
        for wandb_logger in wandb_loggers(self.loggers):
            rows = self.samples.rows if self.samples else None
            # a whole model is not uploaded as an artifact unasked (gigabytes per sweep point)
            artifact = None if self.full else self.run.adapter
            wandb_logger.log_run_end({**record, M.STATUS: M.STATUS_COMPLETED}, artifact, rows)
        if self.full:
            return summary(record, full.trainable_params_line(self.model), self.run.model, label="model")
        return summary(record, lora.trainable_params_line(self.model), self.run.adapter)


def save_adapter_atomically(model, run: RunDir, initial_adapter: Path | None, state=None) -> None:
    """Save the adapter into a temporary folder, then swap it in: a full disk never leaves half an adapter."""
    from lora_exp.model import lora
    from lora_exp.runs.outputs import write_dir_atomically

    write_dir_atomically(run.adapter, lambda tmp: lora.save_adapter(model, tmp, initial_adapter, state))


def _instantiate_logger(logger_cfg, previous: dict[str, Any]):
    """Instantiate a logger; a W&B logger continues the W&B run of the run being resumed."""
    import hydra

    if "wandb" in str(logger_cfg.get("_target_", "")).lower() and previous.get(M.WANDB_RUN_ID):
        return hydra.utils.instantiate(logger_cfg, run_id=previous[M.WANDB_RUN_ID])
    return hydra.utils.instantiate(logger_cfg)


def _export_last_good_adapter(module, run: RunDir, initial_adapter: Path | None, tokenizer=None) -> None:
    """After a non-finite loss: save the adapter of the newest checkpoint, reached with finite losses only.

    With a ``tokenizer`` (``method=full``) the whole model is saved to ``model/`` instead.
    """
    import torch

    from lora_exp.training.resume import latest_checkpoint

    ckpt = latest_checkpoint(run.checkpoints)
    if ckpt is None:
        log.warning("no checkpoint before the non-finite loss: no adapter saved")
        return
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    if not all(torch.isfinite(t).all() for t in state.values()):
        log.warning("the newest checkpoint already holds non-finite weights: no adapter saved")
        return
    module.load_state_dict(state, strict=False)
    if tokenizer is not None:
        full.save_model_atomically(module.model, tokenizer, run)
        log.warning("saved the model of the last good checkpoint (%s) to %s", ckpt.name, run.model)
        return
    save_adapter_atomically(module.model, run, initial_adapter)
    log.warning("saved the adapter of the last good checkpoint (%s) to %s", ckpt.name, run.adapter)


def _unprefixed(state_dict: dict) -> dict:
    """The LightningModule's state dict keyed as the PEFT model's own (without ``model.``)."""
    return {k.removeprefix("model."): v for k, v in state_dict.items()}


def _sample_generations(loggers: list, tokenizer, datamodule):
    """A callback generating replies to the first held-out prompts, when a W&B logger wants them."""
    from lora_exp.training.loggers import wandb_loggers
    from lora_exp.training.samples import SampleGenerations

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


def summary(record: dict[str, Any], params_line: str, adapter: Path, label: str = "adapter") -> str:
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
    lines.append(f"{label}: {adapter}")
    lines.append("=" * 64)
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
