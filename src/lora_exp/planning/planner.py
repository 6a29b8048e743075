"""What a training run will cost, computed without loading a single weight.

The model is built from its architecture on PyTorch's meta device (shapes and dtypes, no
storage) and wrapped by PEFT's own ``get_peft_model``, so parameter counts are PEFT's exact
figures. Peak memory is the sum of what a LoRA training step keeps alive at the start of the
backward pass: frozen weights, adapter, its gradients and optimizer state, the activations
autograd saves for the backward pass, and the loss's logits. The activation terms follow what
autograd actually saves in transformers' Llama, PEFT's LoRA layers and our loss
(:mod:`lora_exp.training.loss`); a test checks the total against a measured CPU run of the default model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_exp.errors import ConfigError, ModelAccessError
from lora_exp.planning.arch import Arch
from lora_exp.planning.memory import (
    DTYPE_BYTES,
    HF_FULL_LOGITS_BYTES,
    activation_bytes,
    compute_bytes,
    dropout_mask_bytes,
    logits_bytes,
    lora_targets,
    optimizer_state_bytes,
    quant_mode,
    step_shape,
    weight_bytes,
)

GIB = 2**30
MIB = 2**20


@dataclass
class Plan:
    """One sweep point's dry-run figures. Byte counts are per device."""

    label: str
    params_line: str
    trainable: int
    total: int
    adapter_file_bytes: int
    micro_batch: int
    seq_len: int
    supervised_per_step: int
    tokens_per_step: int
    world: int
    accumulate: int
    device: str
    checkpointing: bool
    memory: dict[str, int] = field(default_factory=dict)  # the terms summed into peak_bytes
    activations_other: int = 0  # activations with the other checkpointing choice, for comparison
    logits_full: int = 0  # logits of transformers' default full-vocab loss, for comparison
    peak_bytes: int = 0
    gpu_mem_gb: float | None = None
    overhead_gb: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        if not self.gpu_mem_gb:
            return None
        return self.peak_bytes + self.overhead_gb * GIB <= self.gpu_mem_gb * GIB

    def row(self) -> dict[str, Any]:
        """Flat figures for a sweep table or a JSON file."""
        return {
            "point": self.label,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "adapter_mib": round(self.adapter_file_bytes / MIB, 2),
            "tokens_per_step": self.tokens_per_step,
            "peak_gib": round(self.peak_bytes / GIB, 2),
            **{f"mem/{k}_gib": round(v / GIB, 3) for k, v in self.memory.items()},
            "fits": self.fits,
        }


# --------------------------------------------------------------------------- model on meta


def architecture(model_cfg) -> dict[str, Any]:
    """The HF config dict of ``model``, without touching the network.

    Order: ``model.path``'s config.json, the ``config:`` block of the model's yaml, the locally
    converted default model, the local HF cache of ``model.hub_id``.
    """
    from omegaconf import OmegaConf

    if model_cfg.get("path"):
        path = Path(model_cfg.path).expanduser() / "config.json"
        if not path.is_file():
            raise ModelAccessError(f"model.path={model_cfg.path}: no config.json there (expected an HF model folder)")
        return json.loads(path.read_text())
    if model_cfg.get("config"):
        return OmegaConf.to_container(model_cfg.config, resolve=True)
    if model_cfg.get("source") == "embedded":
        from lora_exp.model.load import ensure_smollm2_folder

        return json.loads((ensure_smollm2_folder() / "config.json").read_text())
    hub_id = model_cfg.get("hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    raise ModelAccessError(
        f"model={model_cfg.get('name')}: no architecture to plan with; add a `config:` block (the model's "
        f"config.json fields) to its yaml, or set model.path=DIR"
    )


_META_CACHE: dict[str, tuple[Any, Any]] = {}


def build_meta_model(cfg):
    """The PEFT-wrapped model of ``cfg`` on the meta device: exact shapes and dtypes, no storage.

    PiSSA / OLoRA initialise from the base weights, which do not exist here; the adapter's
    shapes do not depend on the init, so it is built with PEFT's default init. Sweep points that
    share model and LoRA settings share one meta model (it holds no storage and is not modified).
    """
    key = json.dumps([_plain(cfg.model), _plain(cfg.lora)], sort_keys=True, default=str)
    if key not in _META_CACHE:
        _META_CACHE[key] = _build_meta_model(cfg)
    return _META_CACHE[key]


def _build_meta_model(cfg):
    import torch
    from accelerate import init_empty_weights
    from omegaconf import OmegaConf
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_exp.model import lora
    from lora_exp.model.load import torch_dtype

    arch = architecture(cfg.model)
    model_type = arch.pop("model_type", "llama")
    for key in ("architectures", "transformers_version", "_name_or_path", "_model_name_or_path"):
        arch.pop(key, None)
    config = AutoConfig.for_model(model_type, **arch)
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.model.dtype))
    base.tie_weights()  # init_empty_weights skips tying: a tied lm_head would be counted twice
    lora_cfg = OmegaConf.to_container(cfg.lora, resolve=True)
    lora_cfg.pop("init_lora_weights", None)
    lora_cfg["init"] = "default"
    peft_model = get_peft_model(base, lora.peft_config(OmegaConf.create(lora_cfg), base))
    assert next(peft_model.parameters()).device == torch.device("meta")
    return peft_model, config


# --------------------------------------------------------------------------- sizes


def adapter_file_bytes(peft_model) -> int:
    """Size of ``adapter_model.safetensors`` as ``save_pretrained`` would write it.

    The data part is the adapter state dict's bytes; the header is safetensors' JSON index
    (names, dtypes, shapes, offsets) padded to 8 bytes, rebuilt here in the library's order.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    names = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16", "torch.int8": "I8"}
    # safetensors orders tensors by alignment (wider dtypes first), then by name
    order = sorted(state, key=lambda k: (-state[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = state[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": names.get(str(t.dtype), "F32"),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + math.ceil(len(text) / 8) * 8 + offset


def _world(trainer_cfg) -> int:
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int):
        n = devices if devices > 0 else 1
    elif isinstance(devices, str) and devices.isdigit():
        n = int(devices)
    elif isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        n = len(devices)
    else:
        n = 1
    return n * int(trainer_cfg.get("num_nodes", 1) or 1)


def _strategy(trainer_cfg) -> str:
    strategy = trainer_cfg.get("strategy")
    if strategy is None:
        return ""
    if isinstance(strategy, str):
        return strategy.lower()
    return json.dumps(_plain(strategy)).lower()


def _plain(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def make_plan(cfg, label: str = "") -> Plan:
    """Build the meta model of ``cfg`` and compute every figure of its plan."""
    from lora_exp.model import lora, precision

    plan_cfg = cfg.get("plan") or {}
    device = str(plan_cfg.get("device") or "cuda")
    if device not in ("cuda", "cpu"):
        raise ConfigError([f"plan.device={device!r}: expected cuda or cpu"])
    precision.resolve(cfg, precision.planned_device(cfg))  # `auto` as a run on that device would pick
    peft_model, hf_config = build_meta_model(cfg)
    arch = Arch.from_hf(hf_config)
    trainable, total = lora.param_counts(peft_model)
    shape = step_shape(cfg)
    world = _world(cfg.trainer)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    checkpointing = bool(cfg.model.get("gradient_checkpointing", False))
    mode = quant_mode(cfg)

    frozen, adapter, _ = weight_bytes(peft_model, cfg)
    optimizer, optimizer_name = optimizer_state_bytes(peft_model, cfg.optim, fp32_trainable=mode != "none")
    compute = compute_bytes(cfg)
    # the residual stream keeps the embeddings' dtype: fp32 after k-bit preparation
    residual = 4 if mode != "none" else DTYPE_BYTES.get(str(cfg.model.dtype), 4)
    # bitsandbytes layers return their input's dtype, fp32 after k-bit preparation
    linear_out = 4 if mode != "none" else compute
    act_kwargs = dict(
        compute=compute,
        residual=residual,
        linear_out=linear_out,
        mask=dropout_mask_bytes(cfg, device, residual),
        attn=str(cfg.model.get("attn_implementation") or "sdpa"),
    )
    targets = lora_targets(peft_model)
    r, dropout = peft_model.peft_config["default"].r, float(peft_model.peft_config["default"].lora_dropout)
    activations = activation_bytes(arch, shape, targets, r, dropout, checkpointing=checkpointing, **act_kwargs)
    other = activation_bytes(arch, shape, targets, r, dropout, checkpointing=not checkpointing, **act_kwargs)
    chunk = int(cfg.get("loss", {}).get("chunk_size", 4096))
    logits = logits_bytes(arch, shape.supervised, chunk)

    # sharded strategies split weights, gradients and optimizer state across devices
    strategy = _strategy(cfg.trainer)
    shard_weights = world if ("fsdp" in strategy or "stage_3" in strategy) else 1
    shard_state = world if (shard_weights > 1 or "stage_2" in strategy) else 1
    memory = {f"{k}": v // shard_weights for k, v in frozen.items()}
    memory["adapter weights (float32)"] = adapter // shard_weights
    memory["gradients"] = adapter // shard_state
    memory[f"optimizer state ({optimizer_name})"] = optimizer // shard_state
    memory[f"activations ({'with' if checkpointing else 'no'} gradient checkpointing)"] = activations
    memory[f"logits (chunked CE, {min(shape.supervised, chunk):,} positions at once)"] = logits
    if cfg.lora.get("use_dora"):
        # DoRA materialises the merged weight of one adapted layer (fp32) to normalise it
        widest = max(
            (
                m.weight.numel()
                for n, m in peft_model.named_modules()
                if n.endswith("base_layer") and hasattr(m, "weight")
            ),
            default=0,
        )
        memory["DoRA weight-norm buffer"] = 2 * 4 * widest

    plan = Plan(
        label=label,
        params_line=lora.trainable_params_line(peft_model),
        trainable=trainable,
        total=total,
        adapter_file_bytes=adapter_file_bytes(peft_model),
        micro_batch=shape.batch,
        seq_len=shape.seq_len,
        supervised_per_step=shape.supervised * accumulate * world,
        tokens_per_step=shape.tokens * accumulate * world,
        world=world,
        accumulate=accumulate,
        device=device,
        checkpointing=checkpointing,
        memory=memory,
        activations_other=other,
        logits_full=HF_FULL_LOGITS_BYTES * shape.tokens * arch.vocab,
        gpu_mem_gb=float(plan_cfg["gpu_mem_gb"]) if plan_cfg.get("gpu_mem_gb") else None,
        overhead_gb=float(plan_cfg.get("overhead_gb") or 0.0),
    )
    plan.peak_bytes = sum(memory.values())
    if cfg.lora.get("budget") is not None:  # the solved ranks and PEFT's exact count
        from lora_exp.model import budget

        plan.notes.append(budget.describe(peft_model, int(cfg.lora.budget)))
    if cfg.lora.get("init") not in (None, "default", "gaussian"):
        plan.notes.append(f"lora.init={cfg.lora.init}: shapes as planned; the init itself needs the real weights")
    if str(cfg.trainer.get("devices", 1)) == "auto":
        plan.notes.append("trainer.devices=auto: planned for 1 device; set trainer.devices=N for N")
    return plan


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: Plan, cfg) -> str:
    """The single-point report: PEFT's line, adapter size, tokens per step, the memory breakdown."""
    mode = quant_mode(cfg)
    targets = plan_targets(cfg)
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
    lines = [
        f"plan: model={cfg.model.name} quant={mode} lora "
        f"{f'budget={cfg.lora.budget:,}' if cfg.lora.get('budget') is not None else f'r={cfg.lora.r}'} "
        f"alpha={cfg.lora.alpha} on {targets} "
        f"(meta device: no weights loaded)",
        f"precision: model.dtype={cfg.model.dtype} trainer.precision={cfg.trainer.precision}"
        f" (`auto` resolved as a run on this {plan.device} device would)",
        plan.params_line,
        f"adapter on disk: {plan.adapter_file_bytes / MIB:.2f} MiB (adapter_model.safetensors)",
        f"tokens per step: {plan.tokens_per_step:,} = micro-batch {plan.micro_batch} x {plan.seq_len} tokens"
        f" x {plan.accumulate} accumulated x {plan.world} device{'s' if plan.world > 1 else ''}"
        f" (supervised positions <= {plan.supervised_per_step:,})",
        f"estimated peak training memory per {plan.device} device:",
    ]
    width = max(len(k) for k in plan.memory) + 2
    for key, value in plan.memory.items():
        lines.append(f"  {key:<{width}}{_gib(value)}")
    lines.append(f"  {'total':<{width}}{_gib(plan.peak_bytes)}")
    other = "with" if not plan.checkpointing else "without"
    lines.append(
        f"  for comparison: activations {other} gradient checkpointing (model.gradient_checkpointing="
        f"{str(not plan.checkpointing).lower()}) {plan.activations_other / GIB:.2f} GiB; full-vocab logits at "
        f"every position (transformers' default loss) {plan.logits_full / GIB:.2f} GiB"
    )
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(
            f"{verdict} in plan.gpu_mem_gb={plan.gpu_mem_gb:g} "
            f"(with plan.overhead_gb={plan.overhead_gb:g} for CUDA context and fragmentation)"
        )

    lines += [flops_line(plan, cfg), *(f"note: {n}" for n in plan.notes)]
    return "\n".join(lines)


def plan_targets(cfg) -> list[str]:
    from lora_exp.model.lora import resolve_target_modules

    return resolve_target_modules(cfg.lora.target_modules)


def format_table(plans: list[Plan]) -> str:
    """One row per sweep point; points that do not fit are flagged."""
    header = ["#", "point", "trainable", "all params", "adapter MiB", "tokens/step", "peak GiB", "fits"]
    # overrides shared by every point say nothing about the difference between rows
    common = set.intersection(*(set(p.label.split()) for p in plans)) if plans else set()
    rows = []
    for i, p in enumerate(plans):
        label = " ".join(o for o in p.label.split() if o not in common)
        fits = "-" if p.fits is None else ("yes" if p.fits else f"NO (> {p.gpu_mem_gb:g} GiB)")
        rows.append(
            [
                str(i),
                label or "(defaults)",
                f"{p.trainable:,}",
                f"{p.total:,}",
                f"{p.adapter_file_bytes / MIB:.2f}",
                f"{p.tokens_per_step:,}",
                f"{p.peak_bytes / GIB:.2f}",
                fits,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {1}

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [f"all points: {' '.join(sorted(common))}"] if common else []
    return "\n".join([*lines, fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def flops_line(plan, cfg) -> str:
    """``lora_exp.plan``'s line: analytic FLOPs of one optimizer step of the planned micro-batch shape."""
    from lora_exp.planning.flops import from_config, step_estimate

    peft_model, hf_config = build_meta_model(cfg)
    loss = cfg.get("loss") or {}
    checkpointing = bool(cfg.model.get("gradient_checkpointing", False))
    model = from_config(
        hf_config,
        peft_model.peft_config["default"],
        loss_impl=str(loss.get("impl", "chunked")).replace("auto", "chunked"),  # liger costs the same
        chunk_size=int(loss.get("chunk_size", 4096)),
        checkpointing=checkpointing,
        attn_implementation="sdpa",  # whole rows: exact for padded batches, an upper bound for packed ones
    )
    shape = step_shape(cfg)
    per_step = step_estimate(model, shape.batch, shape.seq_len, shape.supervised) * plan.accumulate * plan.world
    return (
        f"training FLOPs per optimizer step: {per_step:.3e} (analytic matmul FLOPs, forward + backward, "
        f"attention over whole {shape.seq_len}-token rows, all devices)"
    )
