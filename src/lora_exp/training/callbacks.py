"""Lightning callbacks: real-token throughput."""

from __future__ import annotations

import time

import lightning as L

from lora_exp import metrics as M


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s``: real (non-padding) tokens per second of training steps.

    The clock covers forward, backward and optimizer step, not validation or checkpointing.
    ``totals()`` gives the whole run's figures for ``metrics.json``, with the wall time of the
    training loop (per-step overhead and data loading included) and the time to the first step.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.supervised = 0
        self.seconds = 0.0
        self._start = 0.0
        self._loop_start: float | None = None
        self._loop_end = 0.0
        self._first_step_s: float | None = None
        self._window: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._loop_start is None:
            self._loop_start = self._start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._loop_end = time.perf_counter()
        elapsed = self._loop_end - self._start
        if self._first_step_s is None:  # what a user waits before training really runs
            self._first_step_s = time.time() - _process_start()
        mask = batch.get("attention_mask")  # packed batches (data.packing=true) have no padding and no mask
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.tokens += tokens
        self.supervised += int((batch["labels"] != -100).sum())
        self.seconds += elapsed
        self._window = (self._window + [(tokens, elapsed)])[-20:]
        rate = sum(t for t, _ in self._window) / max(sum(s for _, s in self._window), 1e-9)
        pl_module.log(M.TRAIN_TOKENS_PER_S, rate, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def state_dict(self) -> dict[str, float]:
        """Token and time counters ride in each checkpoint, so a resumed run's totals cover the whole run."""
        return {"tokens": self.tokens, "supervised": self.supervised, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.supervised = int(state_dict.get("supervised", 0))
        self.seconds = float(state_dict.get("seconds", 0.0))

    def totals(self) -> dict[str, float]:
        return {
            M.TRAIN_TOKENS: self.tokens,
            M.TRAIN_SUPERVISED_TOKENS: self.supervised,
            M.TRAIN_TIME_S: round(self.seconds, 3),
            M.TRAIN_TOKENS_PER_S: self.tokens / self.seconds if self.seconds else 0.0,
            M.TRAIN_LOOP_S: round(self._loop_end - self._loop_start, 3) if self._loop_start is not None else 0.0,
            **({M.FIRST_STEP_S: round(self._first_step_s, 3)} if self._first_step_s is not None else {}),
        }


def _process_start() -> float:
    """Wall-clock time this process started (interpreter start-up and imports included)."""
    import psutil  # a dependency of peft and accelerate

    return psutil.Process().create_time()
