"""The measured counterpart of ``lora_exp.plan``'s memory estimate.

Add it to a run with ``+callbacks.peak_memory._target_=lora_exp.planning.memprobe.PeakMemory``; it writes
``memory.json`` into the run directory: the process's peak memory growth during training (on
CPU the resident set size, on CUDA PyTorch's allocator peak) and the largest micro-batch seen,
so ``python -m lora_exp.plan plan.seq_len=... plan.supervised_fraction=...`` can be compared
with what happened.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import lightning as L

from lora_exp.data.templating import IGNORE_INDEX

MEMORY_FILE = "memory.json"


def _status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` figure (Linux), in KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fault_in(module) -> int:
    """Make every CPU parameter and buffer of ``module`` resident; returns their bytes.

    transformers maps a safetensors file and, where the file's dtype is the one asked for (an fp32
    checkpoint loaded in fp32), keeps the weights as views of that mapping: they become resident
    only when the first forward reads them. Without this, the first training step's RSS growth
    would include the whole frozen base (0.5 GB for the default model in fp32) on top of what
    the step itself adds. A bf16 load of the same file converts, so its weights are resident
    (anonymous memory) from the start and this changes nothing.
    """
    import torch

    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            storage = t.untyped_storage()
            if t.device.type != "cpu" or storage.data_ptr() in seen or not storage.nbytes():
                continue
            seen.add(storage.data_ptr())  # tied weights share one storage
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            raw[::4096].sum()  # one byte per 4 KiB page faults the whole storage in
            total += raw.numel()
    return total


class PeakMemory(L.Callback):
    """Peak memory growth from the start of training to its end, and the largest micro-batch.

    The baseline is taken at ``on_train_start``, once the frozen base and the adapter are loaded,
    so the growth covers what a training step adds: optimizer state, gradients, activations and
    the loss's logits. "Loaded" means resident: see :func:`fault_in`.
    """

    def __init__(self) -> None:
        self.rss_start = 0
        self.rss_peak = 0
        self.cuda_start = 0
        self.cuda_peak = 0
        self.max_width = 0
        self.max_supervised = 0
        self.max_batch = 0
        self.hwm_reset = False
        self.weights_bytes = 0

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        self.weights_bytes = fault_in(pl_module)
        gc.collect()
        self.hwm_reset = reset_peak_rss()
        self.rss_start = self.rss_peak = (_status_kib("VmRSS") or 0) * 1024
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = self.cuda_peak = torch.cuda.memory_allocated()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.max_batch = max(self.max_batch, int(batch["input_ids"].shape[0]))
        self.max_width = max(self.max_width, int(batch["input_ids"].shape[1]))
        self.max_supervised = max(self.max_supervised, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import torch

        hwm = _status_kib("VmHWM") if self.hwm_reset else _status_kib("VmRSS")
        self.rss_peak = max(self.rss_peak, (hwm or 0) * 1024)
        if torch.cuda.is_available():
            self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated())
        self._write(trainer)

    def _write(self, trainer) -> None:
        result = {
            "rss_start_bytes": self.rss_start,
            "rss_peak_bytes": self.rss_peak,
            "rss_growth_bytes": self.rss_peak - self.rss_start,
            "cuda_start_bytes": self.cuda_start,
            "cuda_peak_bytes": self.cuda_peak,
            "cuda_growth_bytes": self.cuda_peak - self.cuda_start,
            "max_batch_size": self.max_batch,
            "max_seq_len": self.max_width,
            "max_supervised_tokens": self.max_supervised,
            "peak_rss_exact": self.hwm_reset,
            "weights_bytes": self.weights_bytes,  # resident in the baseline (parameters and buffers)
        }
        if trainer.is_global_zero:
            Path(trainer.default_root_dir, MEMORY_FILE).write_text(json.dumps(result, indent=2))
