"""The LightningDataModule: examples in, tokenized and padded batches out."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from lora_exp.data import tasks
from lora_exp.data.templating import IGNORE_INDEX, tokenize_chat
from lora_exp.errors import DataError


class Collator:
    """Pad a list of tokenized examples to the longest one; padding is never supervised."""

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


class InstructionDataModule(L.LightningDataModule):
    """Chat-formatted examples, rendered with the tokenizer's template, loss on replies only."""

    def __init__(self, data_cfg, tokenizer, seed: int):
        super().__init__()
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.truncated = 0

    def load_examples(self) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        if cfg.source == "task":
            return tasks.generate(cfg.task, cfg.num_train, cfg.num_val, cfg.get("data_seed", 0))
        raise DataError(f"data.source={cfg.source!r}: expected 'task'")

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        train, val = self.load_examples()
        self.train_rows = self._tokenize(train, "train")
        self.val_rows = self._tokenize(val, "val")

    def _tokenize(self, examples: list[dict], split: str) -> list[dict]:
        rows = []
        for example in examples:
            row = tokenize_chat(
                example["messages"], self.tokenizer, self.cfg.max_seq_len, self.cfg.get("train_on_prompt", False)
            )
            self.truncated += row["truncated"]
            if any(label != IGNORE_INDEX for label in row["labels"]):
                rows.append(row)
        if examples and not rows:
            raise DataError(
                f"no {split} example has a supervised token left within data.max_seq_len={self.cfg.max_seq_len}"
            )
        return rows

    def _loader(self, rows: list[dict], batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            rows,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=Collator(self.tokenizer.pad_token_id),
            num_workers=self.cfg.get("num_workers", 0),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, self.cfg.get("eval_batch_size") or self.cfg.batch_size, shuffle=False)
