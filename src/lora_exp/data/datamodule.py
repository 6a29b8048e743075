"""The LightningDataModule: records in, templated, masked and (optionally) packed batches out."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lora_exp import metrics as M
from lora_exp.data import eval_sets, formats, sources, tasks, tokenized
from lora_exp.data.packing import PackCollator, PadCollator, SeededSampler, TokenBudgetBatchSampler, padding_fraction
from lora_exp.data.templating import IGNORE_INDEX, Renderer
from lora_exp.data.tokenized import tokenizer_hash
from lora_exp.errors import DataError

log = logging.getLogger(__name__)


def source_of(cfg) -> str:
    """Where the data comes from: a hub data set, local files, or a built-in task (in that order)."""
    if cfg.get("hub_name"):
        return "hub"
    if cfg.get("train_path"):
        return "files"
    if cfg.get("task"):
        if cfg.task not in tasks.TASKS:
            raise DataError(f"data.task={cfg.task!r}: unknown task; expected one of {', '.join(tasks.TASKS)}")
        return "task"
    raise DataError("no data: set data.train_path=FILE (data=jsonl) or data.hub_name=NAME")


def check_config(cfg) -> None:
    """Cheap checks of the data keys, before any file is read or weight loaded."""
    source_of(cfg)
    fmt = cfg.get("format", "auto")
    if fmt not in formats.FORMATS:
        raise DataError(f"data.format={fmt!r}: unknown format; expected one of {', '.join(formats.FORMATS)}")
    val_size = cfg.get("val_size", 0.05)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size <= 0:
        raise DataError(f"data.val_size={val_size!r}: expected a count >= 1 or a fraction in (0, 1)")
    pack_tokens = cfg.get("pack_tokens")
    if pack_tokens is not None and (not isinstance(pack_tokens, int) or pack_tokens < cfg.max_seq_len):
        raise DataError(f"data.pack_tokens={pack_tokens!r}: expected an integer >= data.max_seq_len={cfg.max_seq_len}")
    if not isinstance(cfg.get("cache", True), bool):
        raise DataError(f"data.cache={cfg.get('cache')!r}: expected true or false")
    eval_sets.specs(cfg.get("eval_sets"))


class InstructionDataModule(L.LightningDataModule):
    """Examples from a file, a hub data set or a built-in task, rendered with the tokenizer's chat template.

    After ``setup``: ``train_rows`` / ``val_rows`` (token ids and labels), ``stats`` (the
    ``data/*`` entries of metrics.json) and ``fingerprint`` (a hash of the examples, the template,
    the tokenizer and the rendering settings: equal fingerprints mean identical token streams).
    """

    def __init__(self, data_cfg, tokenizer, seed: int):
        super().__init__()
        check_config(data_cfg)
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.truncated = 0
        self.stats: dict[str, Any] = {}
        self.supervised_per_batch = 0.0
        self.flash_attn_kwargs = False  # set by the run when attention is flash_attention_2
        self.fingerprint: str | None = None
        self.format: str | None = None
        self._token_settings: dict | None = None
        # data.eval_sets: name -> token rows, scored as extra validation loaders (lora_exp.data.eval_sets)
        self.eval_set_specs = eval_sets.specs(data_cfg.get("eval_sets"))
        self.eval_rows: dict[str, list[dict]] = {}
        self.renderer = Renderer(
            tokenizer, data_cfg.max_seq_len, data_cfg.get("train_on_prompt", False), data_cfg.get("chat_template")
        )

    # ---- loading ---------------------------------------------------------------------------------
    def load_records(self) -> tuple[list[sources.Record], list[sources.Record]]:
        """Raw train and held-out records; without a held-out source, a deterministic split of train."""
        cfg = self.cfg
        source = source_of(cfg)
        if source == "task":
            train, val = tasks.generate(cfg.task, cfg.num_train, cfg.num_val, cfg.get("data_seed", 0))
            return (
                [sources.Record(r, f"task {cfg.task} train {i}", f"task {cfg.task}") for i, r in enumerate(train)],
                [sources.Record(r, f"task {cfg.task} val {i}", f"task {cfg.task}") for i, r in enumerate(val)],
            )
        if source == "hub":
            train = sources.load_hub(cfg.hub_name, cfg.get("hub_config"), cfg.get("hub_split") or "train")
            val_split = cfg.get("hub_val_split")
            val = sources.load_hub(cfg.hub_name, cfg.get("hub_config"), val_split) if val_split else None
        else:
            train = sources.read_file(cfg.train_path, "data.train_path")
            val = sources.read_file(cfg.val_path, "data.val_path") if cfg.get("val_path") else None
        if val is None:
            train, val = sources.held_out_split(train, cfg.get("val_size", 0.05), cfg.get("split_seed", 0))
        if cfg.get("num_train"):  # a slice for quick runs (debug=quick); the split itself is unchanged
            train = train[: cfg.num_train]
        if cfg.get("num_val"):
            val = val[: cfg.num_val]
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        train, val = self.load_records()
        fields = formats.field_names(self.cfg.get("fields"))
        self.format = formats.resolve(self.cfg.get("format", "auto"), train, fields)
        examples = formats.convert_all(train + val, self.format, fields)  # together: one warning per file
        train_ex, val_ex = examples[: len(train)], examples[len(train) :]
        self.train_rows = self._tokenize(train_ex, train, "train", fields)
        self.val_rows = self._tokenize(val_ex, val, "val", fields)
        self.fingerprint = self._fingerprint(train_ex, val_ex)
        self._load_eval_sets()
        lengths = [len(r["input_ids"]) for r in self.train_rows]
        first_epoch = self._train_batches(lengths)
        supervised = sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in self.train_rows)
        # mean supervised tokens of a training batch: the gradient scale of token-weighted accumulation
        self.supervised_per_batch = supervised / max(len(first_epoch), 1)
        self.stats = {
            M.DATA_FORMAT: self.format,
            M.DATA_TRAIN_EXAMPLES: len(self.train_rows),
            M.DATA_VAL_EXAMPLES: len(self.val_rows),
            M.DATA_TRAIN_TOKENS: sum(lengths),
            M.DATA_TRUNCATED: self.truncated,
            M.DATA_DROPPED: len(train) + len(val) - len(self.train_rows) - len(self.val_rows),
            M.DATA_PACKING: bool(self.cfg.get("packing", False)),
            M.DATA_BATCHING: self.batching,
            M.DATA_PADDING_FRACTION: round(padding_fraction(first_epoch, lengths, self.batching != "padded"), 6),
            M.DATA_FINGERPRINT: self.fingerprint,
        }
        print(
            f"[lora-exp] data: {len(self.train_rows)} train / {len(self.val_rows)} held-out examples "
            f"(format {self.format}), {self.truncated} truncated to data.max_seq_len={self.cfg.max_seq_len}, "
            f"{self.stats[M.DATA_DROPPED]} dropped, padding {100 * self.stats[M.DATA_PADDING_FRACTION]:.1f}%"
            + f", batches {self.batching}",
            flush=True,
        )

    def _tokenize(self, examples: list[dict], records: list[sources.Record], split: str, fields: dict) -> list[dict]:
        """Token rows of one split, from the tokenized-data cache when ``data.cache`` allows (see tokenized)."""
        if self._token_settings is None:  # the tokenizer hash costs ~0.1 s: once per setup
            self._token_settings = tokenized.token_settings(self.renderer, self.format, fields)
        result = tokenized.tokenize_split(
            self.renderer, examples, records, split, self._token_settings, cache=bool(self.cfg.get("cache", True))
        )
        self.truncated += result.truncated
        return result.rows

    def _fingerprint(self, train_ex: list[dict], val_ex: list[dict]) -> str:
        """sha256 of the examples, the chat template, the tokenizer and the settings that shape tokens."""
        h = hashlib.sha256(b"lora-exp-data-v1\0")
        settings = {
            "format": self.format,
            "max_seq_len": self.cfg.max_seq_len,
            "train_on_prompt": bool(self.cfg.get("train_on_prompt", False)),
            "template": self.renderer.template or "",
            "tokenizer": tokenizer_hash(self.tokenizer),
        }
        h.update(json.dumps(settings, sort_keys=True).encode())
        for split, examples, rows in (("train", train_ex, self.train_rows), ("val", val_ex, self.val_rows)):
            h.update(f"\0{split}\0".encode())
            h.update(json.dumps(examples, sort_keys=True, ensure_ascii=False).encode())
            h.update(json.dumps([[r["input_ids"], r["labels"]] for r in rows]).encode())
        return h.hexdigest()

    # ---- batches ---------------------------------------------------------------------------------
    @property
    def packing(self) -> bool:
        return bool(self.cfg.get("packing", False))

    @property
    def batching(self) -> str:
        """``packed`` (token budget), ``padding_free`` (batch_size examples in one flattened row) or ``padded``."""
        if self.packing:
            return "packed"
        return "padding_free" if self.cfg.get("padding_free", True) else "padded"

    def _pack_collator(self) -> PackCollator:
        # flash-attention's variable-length kernel takes the example boundaries precomputed
        return PackCollator(flash_attn_kwargs=self.flash_attn_kwargs)

    @property
    def pack_tokens(self) -> int:
        """Token budget of a packed batch: ``data.pack_tokens``, else batch_size x max_seq_len."""
        return int(self.cfg.get("pack_tokens") or self.cfg.batch_size * self.cfg.max_seq_len)

    def _sampler(self) -> SeededSampler:
        return SeededSampler(len(self.train_rows), self.seed, shuffle=self.cfg.get("shuffle", True))

    def _train_batches(self, lengths: list[int]) -> list[list[int]]:
        """The first epoch's batches (indices), exactly as the train loader will form them."""
        order = list(self._sampler())
        if self.packing:
            return list(TokenBudgetBatchSampler(order, lengths, self.pack_tokens))
        bs = self.cfg.batch_size
        return [order[i : i + bs] for i in range(0, len(order), bs)]

    def train_dataloader(self) -> DataLoader:
        from lora_exp.training.resume import resumable  # a checkpoint records the position inside the epoch

        workers = self.cfg.get("num_workers", 0)
        if self.packing:
            lengths = [len(r["input_ids"]) for r in self.train_rows]
            rank, world = self._rank_and_world()
            batches = TokenBudgetBatchSampler(self._sampler(), lengths, self.pack_tokens, rank, world)
            loader = DataLoader(
                self.train_rows, batch_sampler=batches, collate_fn=self._pack_collator(), num_workers=workers
            )
            return resumable(loader)
        return resumable(
            DataLoader(
                self.train_rows,
                batch_size=self.cfg.batch_size,
                sampler=self._sampler(),
                # padding-free: the batch's examples flattened into one row, positions restarting
                collate_fn=self._pack_collator() if self.batching == "padding_free" else PadCollator(self.pad_id),
                num_workers=workers,
            )
        )

    # ---- evaluation sets ---------------------------------------------------------------------------
    @property
    def eval_set_names(self) -> list[str]:
        """The names of ``data.eval_sets``, in the order of the validation loaders after the held-out one."""
        return list(self.eval_set_specs)

    def _load_eval_sets(self) -> None:
        """Tokenize the file and task sets now (their errors come before any weight loads); probes need the model."""
        for name, spec in self.eval_set_specs.items():
            if eval_sets.kind_of(spec) == "probe":
                continue
            split = eval_sets.load(name, spec, self.cfg, self.renderer)
            self.eval_rows[name] = split.rows
            print(f"[lora-exp] eval set {name}: {len(split.rows)} examples, {split.truncated} truncated", flush=True)

    def _probe_rows(self, name: str) -> list[dict]:
        """A probe's rows, generated by the base model being validated (or read from the probe cache)."""
        from lora_exp.data import probe

        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.lightning_module is None:
            raise RuntimeError(f"data.eval_sets.{name}: a probe needs the model; validate through a Trainer")
        model = trainer.lightning_module.model
        rows, said = probe.rows(
            model, self.tokenizer, self.cfg.max_seq_len, self.renderer.adds_bos, step=trainer.global_step
        )
        print(f"[lora-exp] eval set {name}: {self.eval_set_specs[name]['probe']} probe, {said}", flush=True)
        return rows

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The held-out split's loader; with ``data.eval_sets``, a list: held-out first, then each set."""
        if not self.eval_set_specs:
            return self._eval_loader(self.val_rows)
        for name in self.eval_set_names:
            if name not in self.eval_rows:
                self.eval_rows[name] = self._probe_rows(name)
        extra = [self._eval_loader(self.eval_rows[n], own_rng=True) for n in self.eval_set_names]
        return [self._eval_loader(self.val_rows), *extra]

    def _eval_loader(self, rows: list[dict], own_rng: bool = False) -> DataLoader:
        # Held-out batches stay padded, one example per row: exact match is counted per row.
        sampler = None
        rank, world = self._rank_and_world()
        if self.packing and world > 1:  # Lightning's sampler injection is off (see TokenBudgetBatchSampler)
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            rows,
            batch_size=self.cfg.get("eval_batch_size") or self.cfg.batch_size,
            shuffle=False,
            sampler=sampler,
            # an iterator draws its base seed from the global RNG unless given a generator: the extra
            # sets' loaders draw from their own, so adding sets leaves LoRA dropout's draws unchanged
            generator=torch.Generator() if own_rng else None,
            collate_fn=PadCollator(self.pad_id),
            num_workers=self.cfg.get("num_workers", 0),
        )

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's global rank and the number of processes, from the attached Trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
