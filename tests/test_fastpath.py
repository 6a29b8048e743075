"""The fast path (``speed.*``) gives the plain path's results: attention, dropout, input casts.

Timings live in ``benchmarks/speed.py``; nothing here measures time.
"""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from lora_exp.data.packing import PackCollator, PadCollator
from lora_exp.model import lora
from lora_exp.model.load import load_base_model, resolve_model_folder
from lora_exp.training import fastpath
from lora_exp.training.loss import causal_lm_loss


def _peft(dropout: float = 0.0, dtype: str = "float32"):
    """The tiny random Llama (4 query heads sharing 2 key/value heads) with a non-zero adapter."""
    cfg = compose("model=tiny_llama", f"lora.dropout={dropout}", f"model.dtype={dtype}")
    torch.manual_seed(0)
    model = lora.wrap(load_base_model(cfg.model, resolve_model_folder(cfg.model)), cfg.lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _rows(lengths=(23, 7, 40, 15, 1, 30)) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 49152, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    return rows


def _loss_and_grads(model, batch):
    out = causal_lm_loss(model, batch)
    loss = out.loss_sum / out.n_tokens
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("short_segment", [256, 16, 0], ids=["matmul", "mixed", "sdpa"])
def test_packed_attention_equals_the_block_diagonal_mask_and_padded_batches(monkeypatch, short_segment):
    """One causal attention per packed example == sdpa over the row with transformers' packed mask.

    ``short_segment`` moves the CPU cut-over, so the matmul branch, the sdpa branch and a mix of
    both are each compared; a one-token example is included.
    """
    monkeypatch.setattr(fastpath, "SHORT_SEGMENT", short_segment)
    model = _peft().eval()
    rows = _rows()
    packed = PackCollator()(rows)
    plain_loss, plain_grads = _loss_and_grads(model, packed)  # sdpa, block-diagonal mask from position ids
    padded_loss, _ = _loss_and_grads(model, PadCollator(0)(rows))
    assert fastpath.install(model, {"packed_attention": True}) == ["packed_attention"]
    assert model.get_base_model().config._attn_implementation == fastpath.ATTN_NAME
    fastpath._last = None
    fast_loss, fast_grads = _loss_and_grads(model, packed)
    assert [b - a for a, b in fastpath._last[1]] == [len(r["input_ids"]) for r in rows]  # split per example
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_attention_leaves_padded_batches_and_generation_to_sdpa():
    """Rows that are not packed (padding masks, decoding with a cache) take transformers' sdpa unchanged."""
    model = _peft().eval()
    batch = PadCollator(0)(_rows())
    ids = torch.tensor([_rows()[0]["input_ids"][:10]])
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        gen_before = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        fastpath.install(model, {"packed_attention": True})
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        gen_after = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(after, before)
    assert gen_after.tolist() == gen_before.tolist()


def test_packed_attention_under_bf16_matches_the_masked_path():
    """In the training precision (bf16 base, bf16 autocast) the loss agrees to bf16 accuracy."""
    model = _peft(dtype="bfloat16").eval()
    packed = PackCollator()(_rows())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = causal_lm_loss(model, packed)
        fastpath.install(model, {"packed_attention": True})
        fast = causal_lm_loss(model, packed)
    torch.testing.assert_close(fast.loss_sum / fast.n_tokens, plain.loss_sum / plain.n_tokens, rtol=2e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bits_dropout_drops_at_rate_p_and_keeps_the_expectation(dtype):
    torch.manual_seed(0)
    drop = fastpath.BitsDropout(0.1).train()
    x = torch.full((512, 512), 2.0, dtype=dtype, requires_grad=True)
    y = drop(x)
    kept = y != 0
    n = x.numel()
    p_eff = drop.threshold / 2**15
    assert abs(p_eff - 0.1) < 1e-4
    # 5 standard deviations of a binomial rate
    assert abs((~kept).float().mean().item() - p_eff) < 5 * (p_eff * (1 - p_eff) / n) ** 0.5
    torch.testing.assert_close(y[kept].float(), torch.full_like(y[kept].float(), 2.0 * drop.scale), rtol=1e-2, atol=0)
    y.float().sum().backward()  # the gradient is the same mask, scaled
    assert torch.equal(x.grad != 0, kept)
    drop.eval()
    assert drop(x) is x


def test_bits_dropout_masks_are_independent_across_elements_and_calls():
    """Each of the four 15-bit fields of a 64-bit draw is uniform; consecutive calls differ."""
    torch.manual_seed(0)
    drop = fastpath.BitsDropout(0.5).train()
    x = torch.ones(4 * 50_000, dtype=torch.bfloat16)
    a, b = drop(x) != 0, drop(x) != 0
    for field in range(4):  # every field of the 64-bit word drops half
        assert abs(a.view(-1, 4)[:, field].float().mean().item() - 0.5) < 0.01
    assert abs((a & b).float().mean().item() - 0.25) < 0.01  # two calls are independent


def test_bits_dropout_is_installed_in_every_lora_layer_and_the_adapter_loads_in_plain_peft(tmp_path):
    from peft import PeftModel

    model = _peft(dropout=0.05)
    n_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert fastpath.install(model, {"lora_dropout": True}) == ["lora_dropout"]
    drops = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_A")]
    assert len(drops) == n_layers > 0 and all(isinstance(d, fastpath.BitsDropout) for d in drops)
    model.save_pretrained(tmp_path)
    cfg = compose("model=tiny_llama")
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, resolve_model_folder(cfg.model)), tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lean_casts_give_the_same_loss_and_gradients_under_autocast():
    """LoRA layers fed their bf16 input directly == PEFT's fp32 copy, since autocast runs them in bf16."""
    model = _peft(dtype="bfloat16").eval()
    batch = PackCollator()(_rows())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grads = _loss_and_grads(model, batch)
        with fastpath.lean_casts(model, True):
            assert not any(
                getattr(m, "cast_input_dtype_enabled", False) for m in model.modules() if hasattr(m, "lora_A")
            )
            fast_loss, fast_grads = _loss_and_grads(model, batch)
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_A"))  # restored
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-3, atol=0)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-4)


def test_lean_casts_are_off_without_autocast():
    model = _peft()
    with fastpath.lean_casts(model, True):
        assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_A"))
