"""The supervised-positions-only, chunked loss equals transformers' own causal-LM loss."""

from __future__ import annotations

import pytest
import torch

from lora_exp.training.loss import causal_lm_loss


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 49152, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 9:] = 0
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk_size", [4096, 7])
def test_loss_and_gradients_match_transformers(tiny_peft, chunk_size):
    batch = _batch()
    ref = tiny_peft(**batch, use_cache=False).loss
    ref_grads = torch.autograd.grad(ref, [p for p in tiny_peft.parameters() if p.requires_grad])
    out = causal_lm_loss(tiny_peft, batch, chunk_size=chunk_size)
    loss = out.loss_sum / out.n_tokens
    grads = torch.autograd.grad(loss, [p for p in tiny_peft.parameters() if p.requires_grad])
    assert out.n_tokens == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


def test_exact_match_counts_examples_whose_argmax_is_right(tiny_peft):
    batch = _batch()
    with torch.no_grad():
        logits = tiny_peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        batch["labels"] = torch.where(batch["labels"] == -100, -100, torch.roll(logits.argmax(-1), 1, dims=1))
        batch["labels"][0, 10] = (batch["labels"][0, 10] + 1) % 49152  # example 0 gets one token wrong
        out = causal_lm_loss(tiny_peft, batch, with_accuracy=True)
    assert out.n_examples == 3 and out.n_exact == 2
    assert out.n_correct == out.n_tokens - 1
