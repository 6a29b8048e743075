"""The LightningModule around a PEFT-wrapped causal LM."""

from __future__ import annotations

import math

import hydra
import lightning as L
import torch
from torchmetrics import SumMetric

from lora_exp import metrics as M
from lora_exp.training import fastpath
from lora_exp.training.loss import LOSSES, causal_lm_loss


class LoraModule(L.LightningModule):
    """Trains the adapter of ``model`` (a ``PeftModel``); the frozen base never reaches a checkpoint.

    Validation metrics are logged under ``metric_prefix`` + the shared names, so the same loop
    measures the base model (``base/val/loss``) before training and the adapter after. With
    ``data.eval_sets`` the datamodule gives one loader per set after the held-out one; each is
    summed apart and logged as ``val/<name>/...`` (``lora_exp.metrics.eval_set``).
    """

    def __init__(
        self, model, optim_cfg, loss_chunk_size: int = 4096, loss_impl: str = "chunked", lean_casts: bool = False
    ):
        super().__init__()
        self.model = model
        self.lean_casts = lean_casts  # speed.no_input_cast: see lora_exp.training.fastpath
        # gradients of summed token losses, divided by the window's supervised tokens before each
        # optimizer step (see on_before_optimizer_step); the scale keeps magnitudes as for a mean
        self.token_norm: float | None = None
        self._window_tokens = torch.zeros((), dtype=torch.long)
        self.optim_cfg = optim_cfg
        self.loss_chunk_size = loss_chunk_size
        self.train_loss = LOSSES[loss_impl]  # "full": transformers' loss, for speed comparisons
        self.metric_prefix = ""
        self.strict_loading = False  # checkpoints hold trainable weights only
        self.last_val: dict[str, float] = {}
        self.last_val_step = -1
        self._val = _sums()  # the held-out split (dataloader 0)
        self._eval_sets = torch.nn.ModuleDict()  # name -> sums of data.eval_sets.<name> (dataloaders 1, 2, ...)
        self._eval_names: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with fastpath.lean_casts(self.model, self.lean_casts):
            out = self.train_loss(self.model, batch, self.loss_chunk_size)
        loss = out.loss_sum / out.n_tokens.clamp(min=1)
        n = batch["input_ids"].shape[0]
        self.log(M.TRAIN_LOSS, loss.detach(), prog_bar=True, batch_size=n)
        self.log(M.TRAIN_LR, self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        if self.token_norm is None:
            return loss
        self._window_tokens = self._window_tokens + out.n_tokens.detach()
        # Lightning divides what is returned by accumulate_grad_batches before backward
        return out.loss_sum * (self.trainer.accumulate_grad_batches / self.token_norm)

    def on_train_start(self) -> None:
        """Token-weighted gradient accumulation, unless DeepSpeed owns the gradients.

        Every micro-batch's summed loss is back-propagated as is, and the accumulated gradients are
        divided by the supervised tokens of the whole window, over all ranks: the gradient of the
        token mean over everything the optimizer step saw, whatever the lengths of its micro-batches
        (averaging per-micro-batch means over-weights the tokens of short micro-batches:
        transformers#34191). ``token_norm`` is a constant, the same on every rank (the mean
        supervised tokens of a training batch), so gradient magnitudes stay as for a mean loss.
        """
        strategy = type(self.trainer.strategy).__name__
        per_batch = getattr(self.trainer.datamodule, "supervised_per_batch", None)
        if per_batch and "DeepSpeed" not in strategy:
            self.token_norm = float(per_batch)
        self._window_tokens = torch.zeros((), dtype=torch.long, device=self.device)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.token_norm is None:
            return
        tokens = self.trainer.strategy.reduce(self._window_tokens.float(), reduce_op="sum")
        # data-parallel strategies average gradients over ranks; undo that, then divide by all tokens
        factor = self.token_norm * self.trainer.world_size / max(float(tokens), 1.0)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)
        self._window_tokens = torch.zeros_like(self._window_tokens)

    def on_validation_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._eval_names = list(getattr(datamodule, "eval_set_names", None) or [])
        for name in self._eval_names:
            if name not in self._eval_sets:
                self._eval_sets[name] = _sums().to(self.device)
        for sums in [self._val, *(self._eval_sets[n] for n in self._eval_names)]:
            for metric in sums.values():
                metric.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with fastpath.lean_casts(self.model, self.lean_casts):
            out = causal_lm_loss(self.model, batch, self.loss_chunk_size, with_accuracy=True)
        sums = self._val if dataloader_idx == 0 else self._eval_sets[self._eval_names[dataloader_idx - 1]]
        for key, metric in sums.items():
            metric.update(getattr(out, key).float())

    def on_validation_epoch_end(self) -> None:
        values = _metrics(self._val)
        if values is None:
            return
        for name in self._eval_names:
            values.update({M.eval_set(name, k): x for k, x in (_metrics(self._eval_sets[name]) or {}).items()})
        self.last_val = {self.metric_prefix + k: x for k, x in values.items()}
        self.last_val_step = self.global_step
        # logged from the epoch-end hook: no /dataloader_idx_N suffix, the names already say which set
        self.log_dict(self.last_val, sync_dist=False, add_dataloader_idx=False)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        if cfg.get("loraplus_lr_ratio"):
            optimizer = loraplus_optimizer(self.model, cfg)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            optimizer = hydra.utils.instantiate(cfg.optimizer)(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(cfg.warmup_steps) if cfg.get("warmup_steps") else math.ceil(cfg.warmup_ratio * total)
        scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def _sums() -> torch.nn.ModuleDict:
    """Token and example sums of one validation set (summed over ranks when computed)."""
    return torch.nn.ModuleDict({k: SumMetric() for k in ("loss_sum", "n_tokens", "n_correct", "n_exact", "n_examples")})


def _metrics(sums: torch.nn.ModuleDict) -> dict[str, float] | None:
    """Loss, perplexity, token accuracy and exact match of one set's sums; None when it had no token."""
    v = {k: m.compute().item() for k, m in sums.items()}
    if v["n_tokens"] == 0:
        return None
    loss = v["loss_sum"] / v["n_tokens"]
    return {
        M.VAL_LOSS: loss,
        M.VAL_PPL: math.exp(min(loss, 50.0)),
        M.VAL_TOKEN_ACC: v["n_correct"] / v["n_tokens"],
        M.VAL_EXACT_MATCH: v["n_exact"] / max(v["n_examples"], 1),
    }


def loraplus_optimizer(peft_model, optim_cfg) -> torch.optim.Optimizer:
    """LoRA+ (Hayou et al., 2024) through PEFT: B matrices learn ``loraplus_lr_ratio`` times faster than A.

    ``optim.optimizer`` names the optimizer class and its arguments; ``optim.lr`` is A's rate. The
    schedule scales every parameter group alike, so the ratio holds throughout training.
    """
    from omegaconf import OmegaConf
    from peft.optimizers import create_loraplus_optimizer

    kwargs = OmegaConf.to_container(optim_cfg.optimizer, resolve=True)
    optimizer_cls = hydra.utils.get_class(kwargs.pop("_target_"))  # PEFT needs the class itself
    kwargs.pop("_partial_", None)
    return create_loraplus_optimizer(
        peft_model,
        optimizer_cls,
        lr=float(optim_cfg.lr),
        loraplus_lr_ratio=float(optim_cfg.loraplus_lr_ratio),
        loraplus_lr_embedding=float(optim_cfg.get("loraplus_lr_embedding") or 1e-6),
        loraplus_weight_decay=float(optim_cfg.weight_decay),
        **kwargs,
    )
