"""Analytic training FLOPs of a LoRA step on a Llama-architecture model, batch by batch.

What is counted, and how: matrix-multiply FLOPs only, ``2 * m * n * k`` per product, the
convention of ``torch.utils.flop_counter.FlopCounterMode`` (elementwise work, norms, softmax and
the optimizer step are left out; they are a few percent of a step). A training micro-batch costs:

- frozen linear layers: the forward product, and in the backward pass the input gradient only
  (no weight gradient for a frozen weight), and only where the layer's input requires grad: the
  first layer's q/k/v (and, without attention LoRA, more) see the frozen embeddings, whose
  output needs no gradient;
- LoRA ``A`` (``in -> r``) and ``B`` (``r -> out``): their forward products, both weight
  gradients, the gradient between them, and the input gradient of ``A`` where the input needs it;
- attention: ``Q K^T`` and ``P V`` per block of positions that attend to each other, counted
  over the full square (as FlopCounterMode counts them; causal kernels skip about half). A
  padded row is one block of the padded width; a packed row is one block per example only
  where the kernel splits it (the CPU fast path, flash-attention's variable-length kernel, which
  also drops padding), else one block of the row. The backward pass takes ``dV``, ``dP``,
  ``dQ``, ``dK``: one product each, where needed (flash kernels also recompute ``Q K^T`` in
  their backward, which is not counted);
- the LM head: under ``loss.impl=chunked`` (and ``liger``) on supervised positions only, and
  once more when the chunks are recomputed in the backward pass (more supervised positions than
  ``loss.chunk_size``); under ``loss.impl=full`` on every position;
- gradient checkpointing: each decoder layer's forward once more in the backward pass, less its
  last product (``down_proj``'s ``B``, or its frozen product without LoRA there): non-reentrant
  checkpointing stops recomputing once every saved activation is back, and that product's
  output is saved by nothing (measured against FlopCounterMode). transformers also makes the
  embeddings' output require grad whenever checkpointing is on, so the first layer then takes
  every input gradient too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lora_exp.planning.arch import Arch

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LOSS_ON_SUPERVISED = ("chunked", "liger")  # loss implementations applying the head at supervised positions only
FASTPATH_ATTENTION = "lora_exp_sdpa"  # lora_exp.training.fastpath.ATTN_NAME (kept torch-free here)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class BatchShape:
    """What one micro-batch costs, in positions.

    Attributes:
        rows: rows of the batch.
        row_len: positions per row, padding included (every linear layer runs on all of them).
        blocks: lengths of the blocks of positions that attend to each other (see module docstring).
        supervised: positions whose next token is supervised (where the chunked loss applies the head).
        real: non-padding tokens.
    """

    rows: int
    row_len: int
    blocks: tuple[int, ...]
    supervised: int
    real: int

    @property
    def positions(self) -> int:
        return self.rows * self.row_len


@dataclass(frozen=True)
class FlopsModel:
    """Everything about a model and a run that the FLOPs of a batch depend on.

    Attributes:
        arch: architecture numbers (``planner.Arch``).
        ranks: per decoder layer, the LoRA rank of each adapted module (absent: no LoRA).
        loss_impl: ``chunked``, ``full`` or ``liger`` (``loss.impl``).
        chunk_size: supervised positions per LM-head chunk (``loss.chunk_size``).
        checkpointing: gradient checkpointing of the decoder layers.
        attn_implementation: the attention kernel (decides how packed and padded rows are split).
        inputs_require_grad: the embeddings' output requires grad (trained embeddings, or the
            hook transformers adds with gradient checkpointing), so the first layer's input does.
        head_trainable: the LM head's weight is trained, so its weight gradient is computed.
    """

    arch: Arch
    ranks: tuple[dict[str, int], ...]
    loss_impl: str = "chunked"
    chunk_size: int = 4096
    checkpointing: bool = False
    attn_implementation: str = "sdpa"
    inputs_require_grad: bool = False
    head_trainable: bool = False
    full: bool = False  # method=full: every projection's weight gradient is computed too
    _linear: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        a = self.arch
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        shapes = {"q_proj": (a.hidden, q), "k_proj": (a.hidden, kv), "v_proj": (a.hidden, kv), "o_proj": (q, a.hidden)}
        shapes.update({"gate_proj": (a.hidden, a.intermediate), "up_proj": (a.hidden, a.intermediate)})
        shapes["down_proj"] = (a.intermediate, a.hidden)
        object.__setattr__(self, "_linear", shapes)

    def step(self, shape: BatchShape) -> dict[str, int]:
        """FLOPs of one micro-batch's forward + backward, by part (``total`` is their sum)."""
        parts = {"base": 0, "lora": 0, "attention": 0, "head": 0, "recompute": 0}
        grad = self.inputs_require_grad
        for ranks in self.ranks:
            layer, grad = self._layer(ranks, shape, grad)
            recompute, backward = layer.pop("recompute"), layer.pop("backward")
            for key, value in layer.items():
                parts[key] += value
            if self.checkpointing and backward:  # the layer's forward again, in the backward pass
                parts["recompute"] += recompute
        head, recompute = self._head(shape, grad)
        parts["head"] += head
        parts["recompute"] += recompute
        parts["total"] = sum(parts.values())
        return parts

    def batch_flops(self, batch: dict) -> int:
        """Total FLOPs of one training micro-batch (a collated ``batch`` dict)."""
        return self.step(batch_shape(batch, self.attn_implementation))["total"]

    def _linear_flops(self, name: str, tokens: int, ranks: dict[str, int], grad_in: bool) -> tuple[dict, bool]:
        d_in, d_out = self._linear[name]
        r = ranks.get(name, 0)
        weight_grad = int(self.full)  # full fine-tuning: dW of the projection itself
        out = {"base": 2 * tokens * d_in * d_out * (1 + grad_in + weight_grad), "lora": 0}
        out["forward"] = 2 * tokens * d_in * d_out
        out["backward"] = 2 * tokens * d_in * d_out * (grad_in + weight_grad)
        if r:
            # forward A and B; backward dB, dZ (B's input), dA, and dX through A where the input needs it
            forward = 2 * tokens * r * (d_in + d_out)
            backward = 2 * tokens * r * (2 * d_out + d_in * (1 + grad_in))
            out["lora"] = forward + backward
            out["forward"] += forward
            out["backward"] += backward
        return out, grad_in or r > 0 or self.full

    def _attention(self, shape: BatchShape, q: bool, k: bool, v: bool) -> tuple[int, int]:
        """Forward and backward FLOPs of the score and value products."""
        one = 2 * self.arch.heads * self.arch.head_dim * sum(n * n for n in shape.blocks)  # one product
        backward = one * (int(v) + int(q or k) + int(q) + int(k))  # dV, dP, dQ, dK
        return 2 * one, backward

    def _layer(self, ranks: dict[str, int], shape: BatchShape, grad: bool) -> tuple[dict[str, int], bool]:
        """One decoder layer; ``grad``: its input requires grad. Returns its FLOPs and its output's flag."""
        total = {"base": 0, "lora": 0, "attention": 0, "forward": 0, "backward": 0}
        tokens = shape.positions

        def add(part: dict) -> None:
            for key, value in part.items():
                total[key] += value

        flags = {}
        for name in ("q_proj", "k_proj", "v_proj"):
            part, flags[name] = self._linear_flops(name, tokens, ranks, grad)
            add(part)
        fwd, bwd = self._attention(shape, flags["q_proj"], flags["k_proj"], flags["v_proj"])
        add({"attention": fwd + bwd, "forward": fwd, "backward": bwd})
        part, o_grad = self._linear_flops("o_proj", tokens, ranks, any(flags.values()))
        add(part)
        grad = grad or o_grad  # the residual stream after attention
        part, gate = self._linear_flops("gate_proj", tokens, ranks, grad)
        add(part)
        part, up = self._linear_flops("up_proj", tokens, ranks, grad)
        add(part)
        part, down = self._linear_flops("down_proj", tokens, ranks, gate or up)
        add(part)
        d_in, d_out = self._linear["down_proj"]
        last = 2 * tokens * d_out * (ranks.get("down_proj") or d_in)  # not recomputed (module docstring)
        total["recompute"] = total.pop("forward") - last
        return total, grad or down

    def _head(self, shape: BatchShape, grad: bool) -> tuple[int, int]:
        """LM head FLOPs and the chunked loss's recomputation of them."""
        positions = shape.supervised if self.loss_impl in LOSS_ON_SUPERVISED else shape.positions
        one = 2 * positions * self.arch.hidden * self.arch.vocab
        head = one * (1 + int(grad) + int(self.head_trainable))
        recompute = one if self.loss_impl == "chunked" and shape.supervised > self.chunk_size else 0
        return head, recompute


def from_peft_model(peft_model, loss_impl: str = "chunked", chunk_size: int = 4096) -> FlopsModel:
    """The :class:`FlopsModel` of a PEFT-wrapped Llama as it will train (ranks read off its LoRA layers).

    Raises:
        ValueError: a LoRA layer outside the decoder's q/k/v/o/gate/up/down projections, or DoRA,
            whose extra products are not counted.
    """
    full = not hasattr(peft_model, "get_base_model")  # method=full: a plain causal LM, every weight trained
    causal_lm = peft_model if full else peft_model.get_base_model()
    config = causal_lm.config
    ranks: list[dict[str, int]] = [{} for _ in range(config.num_hidden_layers)]
    for name, module in peft_model.named_modules():
        r = getattr(module, "r", None)
        if not isinstance(r, dict) or not hasattr(module, "lora_A"):
            continue
        if any(getattr(module, "use_dora", {}).values()):
            raise ValueError(f"{name}: DoRA's weight-norm products are not counted")
        for adapter in module.active_adapters:
            _set_rank(ranks, name, r[adapter])
    checkpointing = getattr(causal_lm, "is_activation_checkpointing", None)
    checkpointing = checkpointing if checkpointing is not None else causal_lm.is_gradient_checkpointing
    return FlopsModel(
        arch=Arch.from_hf(config),
        ranks=tuple(ranks),
        loss_impl=loss_impl,
        chunk_size=chunk_size,
        checkpointing=bool(checkpointing),
        attn_implementation=str(config._attn_implementation or "sdpa"),
        inputs_require_grad=bool(getattr(causal_lm, "_require_grads_hooks", None))
        or any(p.requires_grad for p in causal_lm.get_input_embeddings().parameters()),
        head_trainable=any(p.requires_grad for p in causal_lm.get_output_embeddings().parameters()),
        full=full,
    )


def from_config(hf_config, lora_config, **kwargs) -> FlopsModel:
    """The :class:`FlopsModel` from an HF config and a PEFT ``LoraConfig``, with PEFT's own matching.

    ``target_modules``, ``layers_to_transform``, ``exclude_modules`` and ``rank_pattern`` are read
    as PEFT reads them. ``kwargs`` go to :class:`FlopsModel` (loss, checkpointing, attention).
    """
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    ranks: list[dict[str, int]] = [{} for _ in range(hf_config.num_hidden_layers)]
    for i in range(hf_config.num_hidden_layers):
        for name in ATTENTION_MODULES + MLP_MODULES:
            key = f"model.layers.{i}.{'self_attn' if name in ATTENTION_MODULES else 'mlp'}.{name}"
            match = check_target_module_exists(lora_config, key)
            if match and type(match).__name__ != "_ExcludedModule":
                pattern = lora_config.rank_pattern or {}
                ranks[i][name] = int(pattern.get(get_pattern_key(pattern.keys(), key), lora_config.r))
    kwargs.setdefault("attn_implementation", str(getattr(hf_config, "_attn_implementation", None) or "sdpa"))
    saved = set(lora_config.modules_to_save or [])
    checkpointing = kwargs.get("checkpointing", False)  # transformers then hooks the embeddings (see above)
    kwargs.setdefault("inputs_require_grad", checkpointing or "embed_tokens" in saved)
    kwargs.setdefault("head_trainable", "lm_head" in saved)
    return FlopsModel(arch=Arch.from_hf(hf_config), ranks=tuple(ranks), **kwargs)


def _set_rank(ranks: list[dict[str, int]], name: str, r: int) -> None:
    found = re.search(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", name)
    if not found or found.group(2) not in ATTENTION_MODULES + MLP_MODULES:
        raise ValueError(f"{name}: LoRA outside the decoder's projections is not counted")
    ranks[int(found.group(1))][found.group(2)] = int(r)


def batch_shape(batch: dict, attn_implementation: str = "sdpa") -> BatchShape:
    """The :class:`BatchShape` of a collated batch (``input_ids``, ``labels``, optional mask / positions)."""
    ids = batch["input_ids"]
    rows, row_len = (int(n) for n in ids.shape)
    mask = batch.get("attention_mask")
    real = int(mask.sum()) if mask is not None else rows * row_len
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    pos = batch.get("position_ids")
    flash = "flash" in attn_implementation
    fastpath = attn_implementation == FASTPATH_ATTENTION and ids.device.type == "cpu" and rows == 1
    if flash and mask is not None:  # variable-length kernel on the unpadded rows
        blocks = tuple(int(n) for n in mask.sum(dim=1).tolist())
    elif (flash or fastpath) and mask is None and pos is not None:
        blocks = tuple(n for row in pos for n in example_lengths(row))
    else:
        blocks = (row_len,) * rows
    return BatchShape(rows, row_len, blocks, supervised, real)


def example_lengths(positions) -> list[int]:
    """Lengths of the examples packed in one row (a 1-d tensor): ``position_ids`` restart at each example."""
    starts = (positions[1:] != positions[:-1] + 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *starts, int(positions.numel())]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def step_estimate(model: FlopsModel, rows: int, row_len: int, supervised: int, packed_lengths=None) -> int:
    """FLOPs of a planned micro-batch (``lora_exp.plan``): ``rows x row_len``, optionally split into examples."""
    blocks = tuple(packed_lengths) if packed_lengths else (row_len,) * rows
    return model.step(BatchShape(rows, row_len, blocks, supervised, rows * row_len))["total"]
