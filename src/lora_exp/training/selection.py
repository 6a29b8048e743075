"""Which weights a run keeps: the last step's (``checkpoint.select=last``) or the best validation's (``best``).

With ``checkpoint.select=best`` every validation during training (``trainer.val_check_interval=N``
validates every N training batches; the default is once per epoch) is a candidate, scored by
``optimized_metric`` in its direction (``lora_exp.metrics``). The best candidate's trainable weights
are kept in memory (and in every checkpoint, so a resumed run keeps its best too); at the end they
are loaded back before ``adapter/`` is saved, so ``adapter/`` and the ``val/*`` metrics of
``metrics.json`` are the selected step's. ``metrics.json`` records ``checkpoint/selected_step``,
``checkpoint/final_step`` and the last step's metrics under ``last/``.
``trainer.early_stopping.patience=N`` adds Lightning's ``EarlyStopping`` on the same metric.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lora_exp import metrics as M

log = logging.getLogger(__name__)
SELECT = ("last", "best")


class SelectCheckpoint(Callback):
    """Tracks the best validation during training and its trainable weights."""

    def __init__(self, metric: str = M.VAL_LOSS, select: str = "last"):
        if select not in SELECT:
            raise ValueError(f"checkpoint.select={select!r}: expected one of {SELECT}")
        self.metric, self.select = metric, select
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_weights: dict[str, torch.Tensor] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # the base model's measurement and the final validate() are not training candidates
        self.consider(pl_module, trainer.global_step)

    def consider(self, pl_module, step: int) -> None:
        """Make ``pl_module``'s latest validation (at optimizer step ``step``) a candidate."""
        value = pl_module.last_val.get(self.metric)
        if value is None or self.select != "best":
            return
        if self.best_value is None or _better(value, self.best_value, self.metric):
            self.best_value, self.best_step, self.best_metrics = float(value), int(step), dict(pl_module.last_val)
            self.best_weights = {
                n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters() if p.requires_grad
            }

    def restore_best(self, pl_module) -> bool:
        """Load the best candidate's weights into ``pl_module``; False when there is nothing to restore."""
        if self.select != "best" or not self.best_weights:
            return False
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            for name, value in self.best_weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return True

    def record(self, final_step: int, final_metrics: dict[str, float]) -> dict[str, Any]:
        """The record keys of the selection: which step ``adapter/`` holds, and the last step's metrics."""
        out: dict[str, Any] = {M.CHECKPOINT_SELECT: self.select, M.FINAL_STEP: final_step, M.SELECTED_STEP: final_step}
        if self.select == "best" and self.best_step is not None:
            out[M.SELECTED_STEP] = self.best_step
            out.update({M.LAST_PREFIX + k: v for k, v in final_metrics.items()})
            out.update(self.best_metrics)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "best_metrics": self.best_metrics,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")
        self.best_metrics = dict(state.get("best_metrics") or {})
        self.best_weights = dict(state.get("best_weights") or {})


def _better(a: float, b: float, metric: str) -> bool:
    """Whether ``a`` is strictly better than ``b`` in ``metric``'s direction (lower when it has none)."""
    return a > b if M.goal(metric) == "max" else a < b


def early_stopping(cfg, metric: str):
    """Lightning's ``EarlyStopping`` on ``metric`` for ``trainer.early_stopping.patience=N``, else None."""
    from lightning.pytorch.callbacks import EarlyStopping

    es = (cfg.get("trainer") or {}).get("early_stopping") or {}
    patience = es.get("patience")
    if patience is None:
        return None
    mode = "min" if M.goal(metric) == "min" else "max"
    return EarlyStopping(
        monitor=metric, mode=mode, patience=int(patience), min_delta=float(es.get("min_delta", 0.0)), verbose=True
    )
