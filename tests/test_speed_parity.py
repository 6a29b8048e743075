"""Speed work never changes results: the fast paths give the plain paths' losses and gradients.

Timings live in ``benchmarks/speed.py``; nothing here measures time.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose
from lora_exp import metrics as M
from lora_exp.config.validate import validate
from lora_exp.data.packing import PackCollator, PadCollator
from lora_exp.errors import ConfigError
from lora_exp.training.loss import LOSSES


def _rows() -> list[dict]:
    """Examples of different lengths, each with a masked prompt, as the data module yields them."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, prompt in ((23, 9), (7, 3), (15, 11), (30, 4)):
        ids = torch.randint(3, 49152, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _loss_and_grads(model, fn, batch):
    out = fn(model, batch, 5)  # chunk size 5: several LM-head chunks, recomputed in the backward pass
    loss = out.loss_sum / out.n_tokens
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, out.n_tokens, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_loss_equals_the_full_logits_loss(tiny_peft, layout):
    """loss.impl=chunked (the default) and loss.impl=full give the same loss and gradients."""
    rows = _rows()
    batch = PadCollator(0)(rows) if layout == "padded" else PackCollator()(rows)
    fast, n_fast, g_fast = _loss_and_grads(tiny_peft, LOSSES["chunked"], batch)
    plain, n_plain, g_plain = _loss_and_grads(tiny_peft, LOSSES["full"], batch)
    assert n_fast == n_plain > 0
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tiny_peft):
    """Packing removes padding without changing what is learned from the same examples."""
    rows = _rows()
    padded, n_padded, g_padded = _loss_and_grads(tiny_peft, LOSSES["chunked"], PadCollator(0)(rows))
    packed, n_packed, g_packed = _loss_and_grads(tiny_peft, LOSSES["chunked"], PackCollator()(rows))
    assert n_padded == n_packed
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_loss_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="loss.impl='fast'"):
        validate(compose("model=tiny_llama", "loss.impl=fast"))


def test_metrics_record_time_to_first_step_and_training_loop_time(tiny_run):
    record = json.loads((tiny_run / "metrics.json").read_text())
    assert record[M.FIRST_STEP_S] > 0  # process start -> end of the first step
    assert record[M.TRAIN_LOOP_S] >= record[M.TRAIN_TIME_S] > 0  # the loop holds every step and what lies between
