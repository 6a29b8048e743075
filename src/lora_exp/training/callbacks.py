"""Lightning callbacks: real-token throughput and the run's compute accounting."""

from __future__ import annotations

import logging
import time

import lightning as L

from lora_exp import metrics as M

log = logging.getLogger(__name__)


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s``: real (non-padding) tokens per second of training steps.

    The clock covers forward, backward and optimizer step, not validation or checkpointing.
    ``totals()`` gives the whole run's figures for ``metrics.json``, with the wall time of the
    training loop (per-step overhead and data loading included) and the time to the first step.

    It also keeps the run's compute account (``compute/*``): real and supervised tokens, the
    analytic FLOPs of every micro-batch actually trained on (:mod:`lora_exp.planning.flops`, from
    the batch's real lengths), the loop's wall time and device-hours, peak memory, and the model
    FLOPs utilisation where the GPU's peak FLOP/s is known. Counters ride in checkpoints, so a
    resumed run accounts for all of its sessions.
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
        self.supervised_positions = 0  # positions whose next token is supervised (what the loss scores)
        self.flops = 0
        self.wall_before = 0.0  # loop wall time of earlier sessions of a resumed run
        self._flops_model = None
        self._world = 1
        self._device = None
        self._peak_flops: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        """Read off the model what a batch's FLOPs depend on, and the peak FLOP/s of the GPU."""
        from lora_exp.planning import flops
        from lora_exp.training.loss import LOSSES

        self._world = trainer.world_size
        self._device = pl_module.device
        impl = next((k for k, f in LOSSES.items() if f is getattr(pl_module, "train_loss", None)), "chunked")
        try:
            self._flops_model = flops.from_peft_model(
                pl_module.model, impl, getattr(pl_module, "loss_chunk_size", 4096)
            )
        except (ValueError, AttributeError) as e:  # not a Llama-like PEFT model, or DoRA: no FLOPs figure
            log.warning("compute/train_flops not recorded: %s", e)
        self._peak_flops = _peak_flops(trainer, pl_module.device)

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
        self.supervised_positions += int((batch["labels"][:, 1:] != -100).sum())
        if self._flops_model is not None:
            self.flops += self._flops_model.batch_flops(batch)
        self.seconds += elapsed
        self._window = (self._window + [(tokens, elapsed)])[-20:]
        rate = sum(t for t, _ in self._window) / max(sum(s for _, s in self._window), 1e-9)
        pl_module.log(M.TRAIN_TOKENS_PER_S, rate, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def state_dict(self) -> dict[str, float]:
        """Token and time counters ride in each checkpoint, so a resumed run's totals cover the whole run."""
        return {
            "tokens": self.tokens,
            "supervised": self.supervised,
            "seconds": self.seconds,
            "supervised_positions": self.supervised_positions,
            "flops": self.flops,
            "wall": self._wall(),
        }

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.supervised = int(state_dict.get("supervised", 0))
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.supervised_positions = int(state_dict.get("supervised_positions", 0))
        self.flops = int(state_dict.get("flops", 0))
        self.wall_before = float(state_dict.get("wall", 0.0))

    def _wall(self) -> float:
        loop = self._loop_end - self._loop_start if self._loop_start is not None else 0.0
        return self.wall_before + loop

    def totals(self) -> dict[str, float]:
        return {
            M.TRAIN_TOKENS: self.tokens,
            M.TRAIN_SUPERVISED_TOKENS: self.supervised,
            M.TRAIN_TIME_S: round(self.seconds, 3),
            M.TRAIN_TOKENS_PER_S: self.tokens / self.seconds if self.seconds else 0.0,
            M.TRAIN_LOOP_S: round(self._loop_end - self._loop_start, 3) if self._loop_start is not None else 0.0,
            **({M.FIRST_STEP_S: round(self._first_step_s, 3)} if self._first_step_s is not None else {}),
            **self.compute(),
        }

    def compute(self) -> dict[str, float]:
        """This process's ``compute/*`` figures (``distributed.sum_throughput`` sums counts over ranks)."""
        wall = self._wall()
        out = {
            M.COMPUTE_TOKENS_REAL: self.tokens,
            M.COMPUTE_TOKENS_SUPERVISED: self.supervised_positions,
            M.COMPUTE_WALL_S: round(wall, 3),
            M.COMPUTE_DEVICE_HOURS: wall * self._world / 3600,
            M.COMPUTE_PEAK_MEM_MB: round(peak_memory_mb(self._device), 1),
        }
        if self._flops_model is not None:
            out[M.COMPUTE_TRAIN_FLOPS] = self.flops
            if self._peak_flops and self.seconds:  # the same for every rank of a balanced run
                out[M.COMPUTE_MFU] = self.flops / (self.seconds * self._peak_flops)
        return out


def peak_memory_mb(device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else the peak resident set size."""
    import torch

    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # ru_maxrss is in KiB on Linux (benchmarks/speed.py measures it the same way)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_flops(trainer, device) -> float | None:
    """The GPU's peak dense FLOP/s at the run's compute dtype (Lightning's table), None off GPUs or if unknown."""
    if device is None or device.type != "cuda":
        return None
    try:
        from lightning.fabric.utilities.throughput import get_available_flops
        from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

        return get_available_flops(device, _plugin_to_compute_dtype(trainer.precision_plugin))
    except Exception as e:  # a private Lightning helper moved: MFU is a courtesy, not a reason to fail
        log.warning("compute/mfu not recorded: %s: %s", type(e).__name__, e)
        return None


def _process_start() -> float:
    """Wall-clock time this process started (interpreter start-up and imports included)."""
    import psutil  # a dependency of peft and accelerate

    return psutil.Process().create_time()
