"""Memory estimates of one training step: weights, optimizer state, activations, logits.

The figures ``plan`` prints (``planning/planner.py``), from the meta-device model and the config;
``tests/test_plan.py`` checks them against measured CPU steps and published GPU figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_exp.errors import ConfigError
from lora_exp.planning.arch import Arch

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}

# Optimizer state tensors kept per trainable parameter, and bytes per state element (None: the
# parameter's own dtype). Matched against the last component of ``optim.optimizer._target_``.
OPTIMIZER_STATES: dict[str, tuple[int, int | None]] = {
    "AdamW": (2, None),
    "Adam": (2, None),
    "NAdam": (2, None),
    "RAdam": (2, None),
    "Adamax": (2, None),
    "Adagrad": (1, None),
    "RMSprop": (1, None),
    "Lion": (1, None),
    "AdamW8bit": (2, 1),
    "Adam8bit": (2, 1),
    "PagedAdamW8bit": (2, 1),
    "PagedAdamW": (2, None),
    "PagedAdamW32bit": (2, 4),
    "AdamW32bit": (2, 4),
    "Lion8bit": (1, 1),
}

# Bytes the backward pass of a cross-entropy holds per (position, vocabulary entry) at its peak:
# the saved fp32 log-softmax output, the incoming fp32 gradient and the fp32 gradient it produces.
CE_BACKWARD_BYTES = 12
# transformers' default loss: bf16 logits at every position kept in the model output, plus the
# same fp32 log-softmax and its two gradients.
HF_FULL_LOGITS_BYTES = 2 + CE_BACKWARD_BYTES


def quant_mode(cfg) -> str:
    """``quant.mode`` when the ``quant`` group is there, else ``none``."""
    quant = cfg.get("quant")
    return "none" if not quant else str(quant.get("mode", "none"))


def _quantized_bytes(numel: int, out_features: int, mode: str, double_quant: bool) -> float:
    """Storage of one bitsandbytes-quantized linear weight."""
    if mode == "nf4":
        blocks = numel / 64  # one absmax per 64 weights
        # double quantization stores absmax as 8-bit with an fp32 constant per 256 blocks
        return numel / 2 + (blocks + 4 * blocks / 256 if double_quant else 4 * blocks)
    return numel + 4 * out_features  # int8: one byte per weight and an fp32 scale per row


def weight_bytes(peft_model, cfg) -> tuple[dict[str, int], int, int]:
    """Frozen weights by storage kind, trainable weights, and trainable elements.

    Under ``quant``, bitsandbytes quantizes the decoder's linear layers (never ``lm_head``), and
    PEFT's k-bit preparation casts every other frozen weight to fp32.
    """
    import torch

    mode = quant_mode(cfg)
    double_quant = bool(cfg.quant.get("bnb", {}).get("bnb_4bit_use_double_quant", False)) if mode == "nf4" else False
    quantized: dict[int, int] = {}
    if mode != "none":
        for name, module in peft_model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if (
                isinstance(module, torch.nn.Linear)
                and ".layers." in name
                and "lora_" not in name
                and "modules_to_save" not in name
                and leaf != "lm_head"
            ):
                quantized[id(module.weight)] = module.out_features
    frozen: dict[str, int] = {}
    trainable_bytes = trainable_numel = 0
    for _, p in peft_model.named_parameters():
        if p.requires_grad:
            itemsize = 4 if mode != "none" and p.dtype != torch.float32 else p.element_size()
            trainable_bytes += p.numel() * itemsize
            trainable_numel += p.numel()
        elif id(p) in quantized:
            key = f"base weights ({mode})"
            frozen[key] = frozen.get(key, 0) + int(_quantized_bytes(p.numel(), quantized[id(p)], mode, double_quant))
        else:
            dtype = "float32" if mode != "none" else str(p.dtype).removeprefix("torch.")
            key = f"base weights ({dtype})" if mode == "none" else "other weights (float32, k-bit prep)"
            frozen[key] = frozen.get(key, 0) + p.numel() * (4 if mode != "none" else p.element_size())
    return frozen, trainable_bytes, trainable_numel


def optimizer_state_bytes(peft_model, optim_cfg, fp32_trainable: bool = False) -> tuple[int, str]:
    """Optimizer state of the trainable parameters, and a short description.

    ``fp32_trainable``: every trainable weight is fp32 (after PEFT's k-bit preparation).
    """
    target = str(optim_cfg.optimizer.get("_target_", "torch.optim.AdamW"))
    name = target.rsplit(".", 1)[-1]
    if name == "SGD":
        states, per = (1 if optim_cfg.optimizer.get("momentum") else 0), None
    else:
        states, per = OPTIMIZER_STATES.get(name, (2, None))
    total = sum(
        states * p.numel() * (per if per is not None else 4 if fp32_trainable else p.element_size())
        for p in peft_model.parameters()
        if p.requires_grad
    )
    return total, f"{name}, {states} state{'s' if states != 1 else ''}"


# --------------------------------------------------------------------------- activations


@dataclass
class StepShape:
    """One micro-batch as the model sees it."""

    batch: int  # sequences per micro-batch
    seq_len: int  # padded (or packed) length
    supervised: int  # positions reaching the LM head in the micro-batch
    padded: bool  # an attention mask is passed (padding) rather than packed position_ids

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def lora_targets(peft_model) -> set[str]:
    config = peft_model.peft_config["default"]
    targets = config.target_modules
    return {targets} if isinstance(targets, str) else set(targets)


def activation_bytes(
    arch: Arch,
    shape: StepShape,
    targets: set[str],
    r: int,
    dropout: float,
    *,
    compute: int,
    residual: int,
    linear_out: int,
    mask: int,
    attn: str,
    checkpointing: bool,
) -> int:
    """Bytes autograd saves for the backward pass of the decoder stack (one micro-batch).

    Frozen linear layers save only their (existing) weight; what remains per layer is the fp32
    RMSNorm inputs, each LoRA layer's dropped-out input (and dropout mask), the attention inputs
    and output, and the MLP's gate / SiLU / up products.

    Args:
        arch: architecture numbers.
        shape: micro-batch shape.
        targets: LoRA target module names.
        r: LoRA rank.
        dropout: LoRA dropout probability.
        compute: bytes per element of matmul inputs (2 under bf16/fp16, else 4).
        residual: bytes per element of the residual stream.
        linear_out: bytes per element of frozen linear outputs (fp32 under bitsandbytes k-bit).
        mask: bytes per element of a LoRA dropout mask (see :func:`dropout_mask_bytes`).
        attn: ``sdpa``/``flash_attention_2`` (fused kernels) or ``eager`` (keeps probabilities).
        checkpointing: keep only each layer's input and recompute one layer in the backward.
    """
    T, L = shape.tokens, shape.seq_len
    h, inter = arch.hidden, arch.intermediate
    h_q, h_kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    mask_bytes = 0 if dropout == 0 else mask

    def lora_in(name: str, width: int) -> int:
        # dropout saves its mask, the adapter's A matmul keeps its (dropped-out) input in the
        # compute dtype, and B keeps A's r outputs
        return (mask_bytes + compute) * width + compute * r if name in targets else 0

    norm = 4 * h + 4  # fp32 copy of the input and the reciprocal RMS
    qkv_lora = sum(lora_in(n, h) for n in ("q_proj", "k_proj", "v_proj"))
    if attn == "eager":
        # q, repeated k and v; fp32 softmax output and its cast
        attention = 3 * compute * h_q + 6 * arch.heads * L
    elif shape.padded:
        # a mask forces transformers to repeat k/v to every head; the kernel keeps q, k, v, output,
        # the log-sum-exp and its own copy of the mask
        attention = 4 * compute * h_q + 4 * arch.heads + compute * L
    else:
        attention = compute * (2 * h_q + 2 * h_kv) + 4 * arch.heads
    o_lora = lora_in("o_proj", h_q)
    mlp = 3 * linear_out * inter + sum(lora_in(n, h) for n in ("gate_proj", "up_proj")) + lora_in("down_proj", inter)
    per_token = 2 * norm + qkv_lora + attention + o_lora + mlp
    # the first layer's input does not require grad: its first norm and q/k/v dropout keep nothing
    first_layer_saving = norm + sum(mask_bytes * h for n in ("q_proj", "k_proj", "v_proj") if n in targets)
    final_norm = 4 * h
    if checkpointing:
        return T * (arch.layers * residual * h + per_token + final_norm)
    return T * (arch.layers * per_token - first_layer_saving + final_norm)


def dropout_mask_bytes(cfg, device: str, residual: int) -> int:
    """Bytes per element of the mask a LoRA dropout saves for the backward pass.

    On CUDA torch's fused dropout keeps a bool mask. On a CPU the mask is a tensor of its input's
    dtype (torch's CPU dropout multiplies by a noise tensor like its input; ``speed.lora_dropout``
    builds its mask the same way). That input is PEFT's fp32 copy of the layer input, unless
    ``speed.no_input_cast`` skips the copy under a 16-bit autocast: then it is the layer input
    as is, in the residual stream's dtype (measured: 2 bytes in a bf16-mixed step of the
    default model, 4 in an fp32 one).
    """
    if device == "cuda":
        return 1
    mixed = "mixed" in str(cfg.trainer.get("precision", "32")) and compute_bytes(cfg) == 2
    lean = mixed and bool((cfg.get("speed") or {}).get("no_input_cast", False))
    return residual if lean else 4


def logits_bytes(arch: Arch, supervised: int, chunk_size: int) -> int:
    """Peak bytes of our loss's logits: one chunk of supervised positions at a time."""
    return CE_BACKWARD_BYTES * min(supervised, chunk_size) * arch.vocab


# --------------------------------------------------------------------------- the plan


def compute_bytes(cfg) -> int:
    precision = str(cfg.trainer.get("precision", "32"))
    if "16" in precision and "32" not in precision.replace("16", ""):
        return 2
    return DTYPE_BYTES.get(str(cfg.model.dtype), 4) if quant_mode(cfg) == "none" else 2


def step_shape(cfg) -> StepShape:
    """Micro-batch shape: ``plan.seq_len`` (default ``data.max_seq_len``) and the supervised share."""
    plan_cfg = cfg.get("plan") or {}
    batch = int(cfg.data.batch_size)
    seq_len = int(plan_cfg.get("seq_len") or cfg.data.max_seq_len)
    fraction = plan_cfg.get("supervised_fraction")
    fraction = 1.0 if fraction is None else float(fraction)
    if not 0 <= fraction <= 1:
        raise ConfigError([f"plan.supervised_fraction={fraction}: must be between 0 and 1"])
    # the last position of each sequence has no next token to predict
    supervised = math.ceil(fraction * batch * (seq_len - 1))
    return StepShape(batch, seq_len, supervised, padded=not bool(cfg.data.get("packing", False)))
