"""Batches: padded batches, or padding-free packed batches, in a seed-determined order.

Packed batches concatenate examples into one row and restart ``position_ids`` at each example,
with no attention mask. transformers' Llama then derives a block-diagonal causal mask from the
position ids (sdpa, eager) or uses variable-length kernels (flash-attention), so attention never
crosses examples; with ``speed.packed_attention`` (``lora_exp.training.fastpath``) sdpa instead runs one
causal attention per example, which costs the sum of the squared example lengths, not the square
of the row; the loss must run with ``use_cache=False`` (``lora_exp.training.loss`` does), since with
a KV cache the packed sequences are no longer detected and attention leaks. Concatenation is
transformers' ``DataCollatorWithFlattening``, which also drops the label of each example's first
token, so the last token of one example is never trained to predict the next example.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from lora_exp.data.templating import IGNORE_INDEX


class SeededSampler(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``seed`` and the epoch (Lightning sets it)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Consecutive examples of ``sampler``'s order, grouped while their tokens fit in ``max_tokens``.

    With ``world_size`` > 1 (DDP), every rank forms the same batches from the same seeded order and
    takes every ``world_size``-th one, starting at its ``rank``: the ranks see disjoint examples and
    the same number of steps (the last ``len % world_size`` batches of an epoch are left out, as
    ``DistributedSampler(drop_last=True)`` would). Lightning must not inject its own sampler
    (``use_distributed_sampler=False``; ``lora_exp.train`` sets it when ``data.packing`` is on).
    """

    def __init__(
        self, sampler: SeededSampler, lengths: Sequence[int], max_tokens: int, rank: int = 0, world_size: int = 1
    ):
        self.sampler = sampler  # Lightning calls ``batch_sampler.sampler.set_epoch``
        self.lengths = lengths
        self.max_tokens = max_tokens
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        if self.world_size == 1:
            return self._batches()
        every = list(self._batches())
        per_rank = len(every) // self.world_size
        return iter(every[self.rank :: self.world_size][:per_rank])

    def _batches(self) -> Iterator[list[int]]:
        batch: list[int] = []
        used = 0
        for i in self.sampler:
            n = self.lengths[i]
            if batch and used + n > self.max_tokens:
                yield batch
                batch, used = [], 0
            batch.append(i)
            used += n
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)


class PadCollator:
    """Pad a list of examples to the longest one; padding is masked by position, never by token id.

    Masking by position keeps EOS supervised even where a tokenizer's pad id equals its EOS id.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# flash-attention varlen arguments of DataCollatorWithFlattening(return_flash_attn_kwargs=True)
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class PackCollator:
    """Concatenate a list of examples into one padding-free row with restarting ``position_ids``."""

    def __init__(self, flash_attn_kwargs: bool = False):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=flash_attn_kwargs
        )
        self.keys = ("input_ids", "labels", "position_ids") + (FLASH_KEYS if flash_attn_kwargs else ())

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        out = self.flatten([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        return {k: out[k].long() if k in ("input_ids", "labels", "position_ids") else out[k] for k in self.keys}


def padding_fraction(batches: list[list[int]], lengths: Sequence[int], packed: bool) -> float:
    """Share of the token positions in ``batches`` that are padding (zero for packed batches)."""
    if packed:
        return 0.0
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return (total - real) / total if total else 0.0
