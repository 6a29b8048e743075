"""Exact resume: data position, RNG state, atomic checkpoint files, and the stop on a non-finite loss.

Lightning's checkpoint already restores the trainable weights, optimizer, scheduler and loop
counters (``trainer.fit(ckpt_path=...)``). What it leaves out is added here, so that a run killed
mid-epoch and resumed ends with the same adapter, bit for bit on CPU, as an uninterrupted run:

- the position inside the epoch: :class:`ResumableLoader` is a stateful ``DataLoader`` (Lightning
  saves its ``state_dict`` into the checkpoint) and :class:`EpochSampler` draws each epoch's order
  from ``(seed, epoch)`` alone, so any epoch can be regenerated and its first batches skipped;
- the random number generators (LoRA dropout draws from torch's global RNG): :class:`RngState`;
- atomic files: :class:`AtomicCheckpointIO` writes a temporary file, fsyncs it and renames it,
  so a kill during a save leaves the previous checkpoint intact (and a full disk leaves no
  temporary file: one line naming the checkpoint, see ``runs.rundir.as_disk_error``);
- signals: :class:`GracefulStop` turns SIGTERM / SIGINT into a stop at the next optimizer step
  with a checkpoint, ``status: interrupted`` and exit status 143 / 130.

On SLURM: submit the job with a fixed ``hydra.run.dir`` and ``resume=true`` (a first start with no
run there simply starts). Before preempting, SLURM sends SIGTERM: the run saves its checkpoint and
exits 143; the requeued job (``#SBATCH --requeue``) runs the same command and continues where it
stopped (tested here with SIGTERM; not on a real SLURM cluster).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Sampler

from lora_exp.errors import UserError
from lora_exp.runs.rundir import as_disk_error

log = logging.getLogger(__name__)


class SkippingBatchSampler(Sampler[list[int]]):
    """Wraps a batch sampler whose order depends on the epoch only; can skip the epoch's first batches.

    Lightning calls ``set_epoch`` before each epoch; it is passed on to the wrapped sampler(s).
    ``__iter__`` is lazy, so the epoch and the skip are read when the first batch is drawn.
    """

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self.epoch = 0
        self.skip = 0

    @property
    def sampler(self) -> SkippingBatchSampler:
        """Lightning calls ``loader.batch_sampler.sampler.set_epoch`` (never ``batch_sampler.set_epoch``)."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for obj in {id(o): o for o in (self.batch_sampler, getattr(self.batch_sampler, "sampler", None))}.values():
            if callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batch_sampler):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableLoader(DataLoader):
    """A stateful ``DataLoader``: its state is the epoch and the batches served in it.

    Lightning saves the state into each checkpoint and loads it on resume; the next epoch then
    starts after the batches already trained on. Counting happens where batches leave the loader,
    so worker prefetching cannot skew it. The length stays the full epoch: Lightning adds the
    batches already done when it resumes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._served = 0
        self._pending: dict | None = None

    def __iter__(self):
        skipper = self.batch_sampler
        pending, self._pending = self._pending, None
        self._epoch, self._served = skipper.epoch, 0
        if pending and pending.get("epoch") == self._epoch and 0 < pending.get("batches", 0) < len(self):
            self._served = skipper.skip = int(pending["batches"])
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pending = dict(state)


class RestoreDataPosition(L.Callback):
    """Hands the checkpoint's data position to the train loader before the first resumed batch.

    Lightning restores stateful loaders itself only when it creates them after the checkpoint is
    loaded; ``trainer.estimated_stepping_batches`` (the LR schedule's length) creates the loader
    earlier, and the saved position would be silently dropped (the epoch would restart).
    """

    def __init__(self) -> None:
        self._states: list[dict] = []

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._states = fit_loop.get("state_dict", {}).get("combined_loader", [])

    def on_train_start(self, trainer, pl_module) -> None:
        states, self._states = self._states, []
        if not states:
            return
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loaders = [
            lo
            for lo in (loaders if isinstance(loaders, (list, tuple)) else [loaders])
            if hasattr(lo, "load_state_dict")
        ]
        for loader, state in zip(loaders, states):
            loader.load_state_dict(state)


def resumable(loader: DataLoader) -> DataLoader:
    """The same batches as ``loader``, from a loader that Lightning can resume mid-epoch.

    ``loader``'s order must depend on the seed and the epoch only (``set_epoch``), as the data
    module's samplers do. Under a multi-process strategy the loader is returned as it is (Lightning
    re-creates it with a distributed sampler; a mid-epoch resume then restarts the epoch's order).
    """
    if isinstance(loader, ResumableLoader) or loader.batch_sampler is None:
        return loader
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return loader
    return ResumableLoader(
        loader.dataset,
        batch_sampler=SkippingBatchSampler(loader.batch_sampler),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
        worker_init_fn=loader.worker_init_fn,
        # worker seeds come from here, not from the global RNG (which LoRA dropout draws from)
        generator=loader.generator or torch.Generator().manual_seed(0),
    )


# ------------------------------------------------------------------------------------------- RNG


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RngState(L.Callback):
    """Makes each training step's random draws depend only on the steps before it, and checkpoints them.

    The RNG state is captured at the end of every training step and put back at the start of the
    next one. Whatever happens in between (a validation pass, whose ``DataLoader`` draws a seed from
    the global RNG; a checkpoint; a resume) cannot shift LoRA dropout. The captured state goes into
    each checkpoint; Lightning runs checkpoint callbacks last, so it is the current step's.
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._state if self._state is not None else rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = state_dict.get("rng")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._state is not None:
            set_rng_states(self._state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._state = rng_states()


# ----------------------------------------------------------------------------------- checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs, then renames it.

    A rename within one file system is atomic: a kill at any moment leaves either the old or the
    new checkpoint under the final name, never a truncated one. Loading uses ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:  # a full or read-only disk: no partial file, the last good one untouched
            tmp.unlink(missing_ok=True)
            disk = as_disk_error(e, path)
            if disk is not None:
                raise disk from e
            raise
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training ends, so the final state can be resumed or extended.

    ``every_n_train_steps`` null or 0 keeps Lightning's default (end of each epoch).
    """

    def __init__(self, *args, **kwargs):
        if not kwargs.get("every_n_train_steps"):
            kwargs["every_n_train_steps"] = None
        super().__init__(*args, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint in ``checkpoint_dir`` that loads; leftovers of interrupted saves are removed."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    for tmp in checkpoint_dir.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)
    candidates = []
    for path in checkpoint_dir.glob("*.ckpt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a file a crash cut short, or not a checkpoint at all
            log.warning("skipping unreadable checkpoint %s (%s)", path, type(e).__name__)
            continue
        candidates.append((int(state.get("global_step", -1)), path.name == "last.ckpt", path))
    return max(candidates)[2] if candidates else None


# -------------------------------------------------------------------------------- non-finite loss


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss; the run stopped before that step changed the adapter."""


class StopOnNonFiniteLoss(L.Callback):
    """Stops training on the first NaN/inf loss, before backward, so the adapter in memory is the last good one."""

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            value = loss.detach().float().item()
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            precision = (
                ""
                if str(trainer.precision) == "32-true"
                else ", or train in full precision (trainer.precision=32-true)"
            )
            raise NonFiniteLossError(
                f"non-finite training loss ({value}) at step {trainer.global_step}: training stopped before this "
                f"step changed the adapter; adapter/ holds the newest checkpoint reached with finite losses. "
                f"Lower optim.lr (it was {lr:.3g} at this step){precision}."
            )


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------- signals


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run; a resumable checkpoint was saved when training had begun."""

    def __init__(self, signal_name: str, step: int | None, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = 128 + int(getattr(signal, signal_name))  # 143 for SIGTERM, 130 for SIGINT
        where = "before training" if step is None else f"at step {step}"
        saved = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {signal_name} {where}{saved}")


class GracefulStop(L.Callback):
    """SIGTERM / SIGINT stop the run at the next step boundary, with a resumable checkpoint.

    The handlers only note the signal. The run checks it between its own steps
    (:meth:`check`), after each optimizer step (a checkpoint is saved, then training stops) and
    after each validation batch (validation stops at once; during ``fit`` the state after the last
    step is saved first). A second SIGINT stops at once, without a checkpoint. Lightning's own
    SIGTERM handler is replaced while a stage runs: it would exit with status 0.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = 0

    def install(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise RunInterrupted(name, None, None)  # a second Ctrl-C: stop now
        self.signal_name = name
        log.warning("received %s: stopping at the next step boundary (send SIGINT again to stop now)", name)

    def check(self) -> None:
        """Raise :class:`RunInterrupted` when a signal came (between the run's own steps)."""
        if self.signal_name is not None:
            raise RunInterrupted(self.signal_name, None, None)

    def _take_over(self, *args) -> None:  # Lightning installs its SIGTERM handler as a stage starts
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    on_train_start = on_validation_start = on_sanity_check_start = _take_over

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # only at an optimizer-step boundary: mid-accumulation state is not resumable
        if self.signal_name is not None and trainer.global_step != self._step_at_batch_start:
            self._stop(trainer, save=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.signal_name is not None:
            self._stop(trainer, save=trainer.state.fn == "fit" and not trainer.sanity_checking)

    def _stop(self, trainer, save: bool) -> None:
        saved = None
        if save and trainer.global_step > 0:
            trainer.save_checkpoint(self.checkpoint)
            saved = self.checkpoint
        raise RunInterrupted(self.signal_name, trainer.global_step, saved)
