"""``auto`` precision, attention and loss: chosen once per run from the device it will use.

The rule (``resolve``), for every key left at ``auto``:

| device                                   | ``model.dtype`` | ``trainer.precision`` | QLoRA compute |
|------------------------------------------|-----------------|-----------------------|---------------|
| CUDA GPU with bf16 (Ampere and newer)    | bfloat16        | bf16-mixed            | bfloat16      |
| CUDA GPU without bf16 (V100, T4)         | float16         | 16-mixed              | float16       |
| CPU with native bf16 (AVX512-BF16, AMX)  | bfloat16        | bf16-mixed            | bfloat16      |
| any other CPU (AVX2, AVX512 without BF16)| float32         | 32-true               | float32       |

Full fine-tuning (``method=full``) trains every weight, so the model's own weights are the master
weights the optimizer updates: ``auto`` then resolves ``model.dtype`` to float32 on every device
(bf16 weights would lose updates smaller than their 8-bit mantissa resolves), while
``trainer.precision`` keeps the device's mixed choice, so the matmuls still run under bf16 / fp16
autocast where the device has it (the usual mixed-precision recipe).

Why: bf16 is only fast where the hardware multiplies in bf16. On an AVX2 CPU a bf16 matmul runs
~50x slower than fp32 (torch emulates it), so fp32 is the fast choice there. On a GPU without
bf16, fp16 autocast with loss scaling (Lightning's ``16-mixed`` uses a GradScaler) is the usual
safe recipe: the frozen base is held in fp16 (Llama's RMSNorm and softmax upcast to fp32 inside
transformers), the LoRA weights and their optimizer state stay fp32 (PEFT keeps adapters in fp32
over a half-precision base), and the loss is summed in fp32 (``training.loss``).

``model.attn_implementation=auto`` takes flash-attention 2 on CUDA when ``flash_attn`` is
installed (variable-length kernels over packed rows), sdpa otherwise. ``loss.impl=auto`` takes
Liger's fused linear cross-entropy on CUDA when ``liger_kernel`` is installed, the chunked
supervised-positions-only loss otherwise. Explicit values always win; forcing bf16 on a CPU
without it gets a one-line warning. ``LORA_EXP_CPU_BF16=0|1`` overrides the CPU detection
(tests use it to exercise the branch the machine lacks).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; aarch64 lists "bf16" among its Features


@dataclass(frozen=True)
class Device:
    """What the run will execute on, as far as precision choices care."""

    kind: str  # "cuda" or "cpu"
    name: str  # GPU name or CPU model
    bf16: bool  # native bf16 matmuls
    capability: str  # CUDA compute capability "8.0", or torch's CPU capability "AVX2" / "AVX512"

    def describe(self) -> str:
        return f"{self.kind} ({self.name}, {self.capability}, {'native' if self.bf16 else 'no'} bf16)"


@dataclass(frozen=True)
class Choices:
    """The resolved values and the device they were chosen for."""

    model_dtype: str
    trainer_precision: str
    quant_compute_dtype: str | None
    attn_implementation: str
    loss_impl: str
    device: Device
    auto_keys: tuple[str, ...]  # the keys that were ``auto``

    def record(self) -> dict[str, Any]:
        """Flat keys for metrics.json / run.json / W&B."""
        return {
            "precision/model_dtype": self.model_dtype,
            "precision/trainer": self.trainer_precision,
            "precision/quant_compute_dtype": self.quant_compute_dtype,
            "precision/attn_implementation": self.attn_implementation,
            "precision/loss_impl": self.loss_impl,
            "precision/auto_keys": ",".join(self.auto_keys),
            "hardware/device": self.device.kind,
            "hardware/device_name": self.device.name,
            "hardware/capability": self.device.capability,
            "hardware/bf16": self.device.bf16,
        }

    def line(self) -> str:
        """The one line printed at the start of a run."""
        auto = f" (auto: {', '.join(self.auto_keys)})" if self.auto_keys else ""
        return (
            f"device: {self.device.describe()} -> model.dtype={self.model_dtype} "
            f"trainer.precision={self.trainer_precision} attention={self.attn_implementation} "
            f"loss={self.loss_impl}{auto}"
        )


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 / AMX on x86, BF16 on Arm)."""
    forced = os.environ.get("LORA_EXP_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    flags = _cpu_flags()
    if any(f in flags for f in _CPU_BF16_FLAGS):
        return True
    return platform.machine() in ("aarch64", "arm64") and "bf16" in flags


@lru_cache(maxsize=4)
def _cpu_device() -> Device:
    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return Device("cpu", name, cpu_has_native_bf16(), torch.backends.cpu.get_cpu_capability())


def detect(accelerator: str | None = AUTO) -> Device:
    """The device a run with ``trainer.accelerator=accelerator`` will use."""
    import torch

    wants_gpu = str(accelerator or AUTO) in (AUTO, "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        major, minor = torch.cuda.get_device_capability(index)
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return Device("cuda", torch.cuda.get_device_name(index), bf16, f"{major}.{minor}")
    cpu = _cpu_device()
    return Device(cpu.kind, cpu.name, cpu_has_native_bf16(), cpu.capability)


def choose(
    device: Device,
    model_dtype: str = AUTO,
    trainer_precision: str = AUTO,
    quant_compute_dtype: str | None = None,
    attn_implementation: str = AUTO,
    loss_impl: str = AUTO,
    quantized: bool = False,
    full_weights: bool = False,
) -> Choices:
    """Resolve every ``auto`` among the given values for ``device``; explicit values are kept.

    ``full_weights`` (``method=full``): every weight is trained, so an ``auto`` model dtype is
    float32 (fp32 master weights) whatever the device; the trainer precision is unaffected.
    """
    half = "bfloat16" if device.bf16 else ("float16" if device.kind == "cuda" else "float32")
    mixed = {"bfloat16": "bf16-mixed", "float16": "16-mixed", "float32": "32-true"}[half]
    auto_keys = []
    if str(model_dtype) == AUTO:
        auto_keys.append("model.dtype")
        model_dtype = "float32" if full_weights else half
    if str(trainer_precision) == AUTO:
        auto_keys.append("trainer.precision")
        trainer_precision = mixed
    if quantized and str(quant_compute_dtype) == AUTO:
        auto_keys.append("quant.bnb.bnb_4bit_compute_dtype")
        quant_compute_dtype = half
    if str(attn_implementation) == AUTO:
        auto_keys.append("model.attn_implementation")
        flash = device.kind == "cuda" and importlib.util.find_spec("flash_attn") is not None
        attn_implementation = "flash_attention_2" if flash else "sdpa"
    if str(loss_impl) == AUTO:
        auto_keys.append("loss.impl")
        liger = device.kind == "cuda" and importlib.util.find_spec("liger_kernel") is not None
        loss_impl = "liger" if liger else "chunked"
    choices = Choices(
        str(model_dtype),
        str(trainer_precision),
        quant_compute_dtype if quantized else None,
        str(attn_implementation),
        str(loss_impl),
        device,
        tuple(auto_keys),
    )
    _warn_forced_bf16(choices)
    return choices


def _warn_forced_bf16(c: Choices) -> None:
    if c.device.bf16 or c.device.kind != "cpu":
        return
    forced = [
        k
        for k, v in (("model.dtype", c.model_dtype), ("trainer.precision", c.trainer_precision))
        if k not in c.auto_keys and "bf16" in v.replace("bfloat16", "bf16")
    ]
    if forced:
        log.warning(
            "%s: bf16 on a CPU without native bf16 (%s) runs ~50x slower than float32; "
            "the default (auto) would pick float32",
            " and ".join(forced),
            c.device.capability,
        )


def planned_device(cfg) -> Device:
    """The device ``plan`` estimates for: ``plan.device`` (default cuda, a GPU with bf16 unless
    ``plan.bf16=false``), or this machine's CPU for ``plan.device=cpu``."""
    plan_cfg = cfg.get("plan") or {}
    if str(plan_cfg.get("device") or "cuda") == "cpu":
        return detect("cpu")
    return Device("cuda", "planned GPU", bool(plan_cfg.get("bf16", True)), "planned")


def resolve(cfg, device: Device | None = None) -> Choices:
    """Resolve the ``auto`` keys of a composed run config in place and return the choices.

    Called once, at the start of ``train`` (and by ``plan`` for its target device, and by
    ``evaluate``, ``generate``, ``export`` for a run whose saved config still says ``auto``),
    before any weight is loaded. Resolving a resolved config changes nothing.
    """
    from omegaconf import open_dict

    trainer = cfg.get("trainer") or {}
    quant = cfg.get("quant") or {}
    quantized = quant.get("mode", "none") not in (None, "none")
    bnb = quant.get("bnb") or {}
    device = device or detect(trainer.get("accelerator", AUTO))
    choices = choose(
        device,
        model_dtype=DTYPES.get(str(cfg.model.get("dtype", AUTO)), str(cfg.model.get("dtype", AUTO))),
        trainer_precision=str(trainer.get("precision", AUTO)),
        quant_compute_dtype=str(bnb.get("bnb_4bit_compute_dtype", AUTO)) if quantized else None,
        attn_implementation=str(cfg.model.get("attn_implementation") or AUTO),
        loss_impl=str((cfg.get("loss") or {}).get("impl", AUTO)),
        quantized=quantized,
        full_weights=str(cfg.get("method") or "lora") == "full",
    )
    with open_dict(cfg):
        cfg.model.dtype = choices.model_dtype
        cfg.model.attn_implementation = choices.attn_implementation
        if "trainer" in cfg:
            cfg.trainer.precision = choices.trainer_precision
        if "loss" in cfg:
            cfg.loss.impl = choices.loss_impl
        if quantized and "bnb_4bit_compute_dtype" in bnb:
            cfg.quant.bnb.bnb_4bit_compute_dtype = choices.quant_compute_dtype
    return choices


def resolve_attention(name: str | None, device: Device | None = None) -> str:
    """An attention implementation where ``auto`` (or None) becomes this device's choice."""
    if name is None or str(name) == AUTO:
        return choose(device or detect()).attn_implementation
    return str(name)


def resolve_dtype(dtype: str | None, device: Device | None = None) -> str:
    """A dtype name where ``auto`` (or None) becomes this device's fast dtype."""
    if dtype is None or str(dtype) == AUTO:
        return choose(device or detect()).model_dtype
    return DTYPES.get(str(dtype), str(dtype))


def torch_dtype(name: str):
    """The torch dtype of a config name; ``auto`` is this device's choice (``lora_exp.model.precision``)."""
    import torch

    if name == "auto":
        name = resolve_dtype(name)
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: expected one of {sorted(set(DTYPES.values()))}")
    return getattr(torch, DTYPES[name])
