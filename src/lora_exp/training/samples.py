"""Sample generations: replies of the model to the first held-out prompts, logged as a W&B table."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class SampleGenerations(Callback):
    """Greedy generations for the first held-out prompts, made when training ends.

    Runs in ``on_train_end``, while the model is still on its training device (Lightning moves it
    to the CPU right after), under the training precision.

    Args:
        tokenizer: the run's tokenizer.
        examples: held-out chat examples (``{"messages": [...]}``); the last turn is the reference.
        max_new_tokens: length limit of each generation.
        render_prompt: messages -> prompt text ending in the assistant header, rendered exactly as
            in training; default: the tokenizer's chat template.
    """

    def __init__(self, tokenizer, examples: list[dict], max_new_tokens: int = 64, render_prompt=None):
        self.tokenizer = tokenizer
        self.examples = examples
        self.max_new_tokens = max_new_tokens
        self.render_prompt = render_prompt
        self.rows: list[dict[str, Any]] = []

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or not self.examples:
            return
        try:
            with trainer.precision_plugin.forward_context():
                self.rows = generate_samples(
                    pl_module.model, self.tokenizer, self.examples, self.max_new_tokens, self.render_prompt
                )
        except Exception as e:  # samples are a courtesy, never a reason to lose the run
            log.warning("sample generation failed: %s: %s", type(e).__name__, e)


def generate_samples(
    model, tokenizer, examples: list[dict], max_new_tokens: int, render_prompt=None
) -> list[dict[str, Any]]:
    """Greedy-decode the reply to each example's prompt (one left-padded batch); compare with the reference."""
    import torch

    if render_prompt is None:

        def render_prompt(messages):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generated tokens follow each prompt directly
    device = next(p.device for p in model.parameters())
    try:
        prompts = [render_prompt(e["messages"][:-1]) for e in examples]
        batch = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,  # training configs may switch the KV cache off (packing, checkpointing)
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    rows = []
    for example, text in zip(examples, texts):
        messages = example["messages"]
        reference = messages[-1]["content"]
        rows.append(
            {
                "prompt": messages[-2]["content"],
                "reference": reference,
                "generation": text.strip(),
                "exact_match": text.strip() == reference.strip(),
            }
        )
    return rows
