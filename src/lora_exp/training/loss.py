"""Causal-LM loss computed only where it is needed: at supervised positions, chunk by chunk.

The vocabulary projection is applied to the hidden states of supervised positions only (prompt
and padding positions never reach the LM head), in chunks whose fp32 logits are recomputed in the
backward pass instead of being kept, so the full ``tokens x vocab`` logits never exist at once.
The result equals transformers' own shifted cross-entropy (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_exp.data.packing import FLASH_KEYS
from lora_exp.data.templating import IGNORE_INDEX


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed cross-entropy over supervised tokens
    n_tokens: torch.Tensor  # number of supervised tokens
    n_correct: torch.Tensor | None = None  # supervised tokens whose argmax is the target
    n_exact: torch.Tensor | None = None  # examples whose every supervised token is predicted
    n_examples: torch.Tensor | None = None  # examples with at least one supervised token


def flash_kwargs(batch: dict) -> dict:
    """flash-attention's variable-length arguments of a padding-free batch, when the collator made them."""
    return {k: batch[k] for k in FLASH_KEYS if k in batch}


def causal_lm_of(model):
    """The transformers causal LM inside ``model``: a PEFT model's base, or ``model`` itself (``method=full``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _supervised_hidden(causal_lm, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backbone's last hidden states at supervised (shifted) positions, their targets, and the mask."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    out = backbone(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **flash_kwargs(batch),
    )
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    return out.last_hidden_state[:, :-1][mask], targets[mask], mask


def causal_lm_loss(peft_model, batch: dict, chunk_size: int = 4096, with_accuracy: bool = False) -> LossOutput:
    """Shifted next-token cross-entropy of ``batch`` under ``peft_model``.

    Args:
        peft_model: a PEFT-wrapped causal LM (LoRA layers are injected in place), or a plain
            causal LM (full fine-tuning).
        batch: ``input_ids``, ``labels`` (``-100`` = unsupervised), optional ``attention_mask``
            and ``position_ids``.
        chunk_size: supervised positions per LM-head chunk.
        with_accuracy: also count argmax hits and fully-correct examples (teacher forcing; a
            fully-correct example is exactly what greedy decoding would produce).
    """
    causal_lm = causal_lm_of(peft_model)
    head = causal_lm.get_output_embeddings()
    hidden, targets, mask = _supervised_hidden(causal_lm, batch)
    rows = mask.nonzero()[:, 0]
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    hits = []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if with_accuracy:
            logits = head(h).float()
            loss_sum = loss_sum + F.cross_entropy(logits, t, reduction="sum")
            hits.append(logits.argmax(-1) == t)
        elif torch.is_grad_enabled() and hidden.shape[0] > chunk_size:
            loss_sum = loss_sum + checkpoint(_chunk_ce, head, h, t, use_reentrant=False)
        else:
            loss_sum = loss_sum + _chunk_ce(head, h, t)
    result = LossOutput(loss_sum, mask.sum())
    if with_accuracy:
        correct = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=mask.device)
        n_rows = batch["input_ids"].shape[0]
        per_row = torch.bincount(rows, minlength=n_rows)
        wrong = torch.bincount(rows[~correct], minlength=n_rows)
        result.n_correct = correct.sum()
        result.n_exact = ((per_row > 0) & (wrong == 0)).sum()
        result.n_examples = (per_row > 0).sum()
    return result


def full_logits_loss(peft_model, batch: dict, chunk_size: int = 4096) -> LossOutput:
    """The plain path: transformers' own loss over the full ``tokens x vocab`` logits.

    Same value as ``causal_lm_loss`` (a test checks it); kept as ``loss.impl=full`` to measure
    what the supervised-positions-only chunked loss saves.
    """
    out = peft_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        labels=batch["labels"],
        use_cache=False,
        **flash_kwargs(batch),
    )
    n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    return LossOutput(out.loss.float() * n_tokens, n_tokens)


def liger_loss(peft_model, batch: dict, chunk_size: int = 4096) -> LossOutput:
    """Liger's fused linear cross-entropy (CUDA, ``pip install liger-kernel``) at supervised positions.

    The LM head and the cross-entropy run as one Triton kernel that never materialises the logits.
    Where the head is not a plain ``Linear`` (LoRA on ``lm_head``, ``modules_to_save``), the chunked
    loss is used instead, since Liger reads the head's weight directly.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    causal_lm = causal_lm_of(peft_model)
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return causal_lm_loss(peft_model, batch, chunk_size)
    hidden, targets, mask = _supervised_hidden(causal_lm, batch)
    loss_sum = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)
    return LossOutput(loss_sum.float(), mask.sum())


LOSSES = {"chunked": causal_lm_loss, "full": full_logits_loss, "liger": liger_loss}
