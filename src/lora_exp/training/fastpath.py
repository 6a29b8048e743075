"""The training fast path: same results as the plain path, less work per token (``speed.*`` keys).

Three levers, each measured in ``benchmarks/speed.py`` and each checked against the plain path in
``tests/test_fastpath.py``:

- ``speed.packed_attention``: a packed row (``position_ids`` restarting at each example, see
  ``lora_exp.data.packing``) runs as one causal attention per example instead of one attention
  over the whole row under a block-diagonal mask, so attention costs the sum of the squared
  example lengths, not the squared row length. On CPU, examples shorter than
  :data:`SHORT_SEGMENT` tokens take a grouped-query matmul + fp32 softmax, which for such lengths
  is about twice as fast (forward + backward) as torch's CPU flash kernel; longer ones take
  ``scaled_dot_product_attention`` with ``is_causal``. Unpacked batches and decoding go to
  transformers' own sdpa unchanged, and so do CUDA tensors: on a GPU a Python loop over examples
  per layer would cost more than it saves, so a packed row takes one sdpa call under the
  block-diagonal mask, or flash-attention's variable-length kernel with
  ``model.attn_implementation=flash_attention_2`` (the ``auto`` choice when flash-attn is installed).
- ``speed.lora_dropout``: LoRA dropout masks drawn from 15 random bits per element (four elements
  per 64-bit draw). torch's CPU dropout draws a float per element, ~10x slower; it was 13% of a
  CPU training step. The keep probability is ``1 - round(p * 2**15) / 2**15`` (0.049988 for
  p=0.05) and kept values are scaled by its inverse, so the expectation is exact. CUDA tensors use
  torch's fused dropout.
- ``speed.no_input_cast``: under bf16/fp16 autocast, PEFT's cast of each LoRA layer's input to the
  fp32 adapter dtype (a copy per layer, forward and backward) is skipped: autocast runs the LoRA
  matmuls in the autocast dtype either way (``peft.helpers.disable_input_dtype_casting``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

ATTN_NAME = "lora_exp_sdpa"
SHORT_SEGMENT = 256  # below this length the CPU matmul path beats the flash kernel (forward + backward)
DROPOUT_BITS = 15
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # the int16 bit pattern of 1.0


# ---- packed attention -----------------------------------------------------------------------------
_last: tuple[torch.Tensor, list[tuple[int, int]]] | None = None
_causal: dict[int, torch.Tensor] = {}


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each packed example in a one-row ``position_ids``: where positions restart.

    Every decoder layer sees the same ``position_ids`` tensor, so the last answer is kept.
    """
    global _last
    if _last is not None and _last[0] is position_ids:
        return _last[1]
    pos = position_ids[0]
    restarts = (pos[1:] != pos[:-1] + 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *restarts, pos.numel()]
    out = list(zip(bounds[:-1], bounds[1:]))
    _last = (position_ids, out)
    return out


def _causal_bias(n: int, device) -> torch.Tensor:
    bias = _causal.get(n)
    if bias is None or bias.device != device:
        bias = torch.full((n, n), float("-inf"), device=device).triu(1)
        if len(_causal) > 512:
            _causal.clear()
        _causal[n] = bias
    return bias


def _short_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of one example: q ``[H, n, D]``, k/v ``[KV, n, D]`` -> ``[H, n, D]``.

    Query heads are grouped by their key/value head (the layout ``repeat_kv`` assumes), so the
    keys and values are never repeated.
    """
    heads, n, dim = q.shape
    kv = k.shape[0]
    groups = heads // kv
    scores = (q * scaling).reshape(kv, groups * n, dim) @ k.transpose(-1, -2)
    probs = (scores.view(kv, groups, n, n).float() + _causal_bias(n, q.device)).softmax(-1).to(q.dtype)
    return (probs.view(kv, groups * n, n) @ v).view(heads, n, dim)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: sdpa, with packed rows split into their examples."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    n = query.shape[2]
    packed = (
        query.device.type == "cpu"  # GPUs: one sdpa call over the row (or flash varlen), never a Python loop
        and pos is not None
        and pos.dim() == 2
        and pos.shape == (1, n)
        and query.shape[0] == 1
        and key.shape[2] == n
        and dropout == 0.0
        and not kwargs.get("output_attentions")
    )
    seg = segments(pos) if packed else []
    if len(seg) <= 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    outs = []
    for a, b in seg:
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        if b - a < SHORT_SEGMENT:
            outs.append(_short_causal(q[0], k[0], v[0], scaling).transpose(0, 1))
        else:
            out, _ = sdpa_attention_forward(module, q, k, v, None, scaling=scaling, is_causal=True)
            outs.append(out[0])
    return torch.cat(outs, dim=0).unsqueeze(0), None


def register_attention() -> str:
    """Register :func:`packed_sdpa_attention` (and sdpa's mask builder) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


# ---- LoRA dropout ---------------------------------------------------------------------------------
class BitsDropout(torch.nn.Module):
    """Dropout whose mask comes from 15 random bits per element; see the module docstring."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} not in [0, 1)")
        self.p = p
        self.threshold = round(p * 2**DROPOUT_BITS)
        self.scale = 2**DROPOUT_BITS / (2**DROPOUT_BITS - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.is_cuda:
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        bits = words.view(torch.int16)[:n] & (2**DROPOUT_BITS - 1)
        one = _ONE_BITS.get(x.dtype)
        if one is None:
            mask = (bits >= self.threshold).to(x.dtype)
        else:  # 1.0 / 0.0 built in the integer domain: (bits - threshold) >> 15 is -1 exactly where dropped
            mask = (~((bits - self.threshold) >> DROPOUT_BITS) & one).view(x.dtype)
        return (x * mask.view(x.shape)).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}, effective p={self.threshold / 2**DROPOUT_BITS:.6f}"


def install_bits_dropout(peft_model) -> int:
    """Replace PEFT's ``nn.Dropout`` in every LoRA layer by :class:`BitsDropout`; returns how many."""
    count = 0
    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                drops[name] = BitsDropout(drop.p)
                count += 1
    return count


# ---- input casts ----------------------------------------------------------------------------------
def lean_casts(peft_model, enabled: bool):
    """Skip PEFT's fp32 input casts while a low-precision autocast is active (else a no-op)."""
    from peft.helpers import disable_input_dtype_casting

    device = "cuda" if torch.cuda.is_available() and torch.is_autocast_enabled("cuda") else "cpu"
    active = (
        enabled
        and torch.is_autocast_enabled(device)
        and torch.get_autocast_dtype(device) in (torch.bfloat16, torch.float16)
    )
    if not active:
        return contextlib.nullcontext()
    return disable_input_dtype_casting(peft_model)


def install(peft_model, speed_cfg) -> list[str]:
    """Switch on the ``speed.*`` levers that act on the model; returns what was switched on.

    ``peft_model`` may also be a plain causal LM (``method=full``): packed attention applies as is,
    and there is no LoRA dropout to replace.
    """
    from lora_exp.training.loss import causal_lm_of

    speed_cfg = speed_cfg or {}
    done = []
    base = causal_lm_of(peft_model)
    if speed_cfg.get("packed_attention", False) and base.config._attn_implementation == "sdpa":
        base.set_attn_implementation(register_attention())
        done.append("packed_attention")
    if speed_cfg.get("lora_dropout", False) and install_bits_dropout(peft_model):
        done.append("lora_dropout")
    return done
