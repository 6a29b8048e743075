"""Lightning callbacks: real-token throughput."""

from __future__ import annotations

import time

import lightning as L

from lora_exp import metrics as M


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s``: real (non-padding) tokens per second of training steps.

    The clock covers forward, backward and optimizer step, not validation or checkpointing.
    ``totals()`` gives the whole run's figures for ``metrics.json``.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.supervised = 0
        self.seconds = 0.0
        self._start = 0.0
        self._window: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        mask = batch.get("attention_mask")  # packed batches (data.packing=true) have no padding and no mask
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.tokens += tokens
        self.supervised += int((batch["labels"] != -100).sum())
        self.seconds += elapsed
        self._window = (self._window + [(tokens, elapsed)])[-20:]
        rate = sum(t for t, _ in self._window) / max(sum(s for _, s in self._window), 1e-9)
        pl_module.log(M.TRAIN_TOKENS_PER_S, rate, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def totals(self) -> dict[str, float]:
        return {
            M.TRAIN_TOKENS: self.tokens,
            M.TRAIN_SUPERVISED_TOKENS: self.supervised,
            M.TRAIN_TIME_S: round(self.seconds, 3),
            M.TRAIN_TOKENS_PER_S: self.tokens / self.seconds if self.seconds else 0.0,
        }
