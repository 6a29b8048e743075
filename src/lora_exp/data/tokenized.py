"""Tokenized splits: built once with a progress bar, then cached across runs and sweep points.

A split is tokenized through ``datasets.Dataset.map`` (its progress bar on the first build; several
processes when the split is large) and stored under ``<cache root>/data/<key>/`` (the cache root is
``$LORA_EXP_CACHE`` or ``~/.cache/lora_exp``; delete ``data/`` there to clear it). The key is a
sha256 of everything that decides the tokens: the normalized examples and where each came from,
the format and field mapping, ``max_seq_len``, ``train_on_prompt``, the chat template, the
tokenizer (vocabulary, merges, normalizer, special tokens, BOS behaviour) and the source of the
rendering code, so any change to these misses the cache, and a hit gives exactly the rows a fresh
build would. An entry is written into a temporary folder and renamed into place, so a killed run
never leaves a half-written entry that looks complete. ``data.cache=false`` neither reads nor writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lora_exp.data import templating
from lora_exp.data.sources import Record
from lora_exp.data.templating import Renderer
from lora_exp.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = "lora-exp-tokenized-v1"
# splits larger than this are tokenized by several processes (datasets' num_proc)
MULTIPROCESS_MIN_EXAMPLES = 10_000
MAX_PROCESSES = 8
_STALE_TMP_S = 3600  # a temporary folder older than this belongs to a killed run


@dataclass
class Split:
    """A tokenized split: rows that have a supervised token, and what tokenizing dropped or cut."""

    rows: list[dict]
    truncated: int = 0
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)  # said on the first build, said again on a cache hit


def tokenizer_hash(tokenizer) -> str:
    """A hash of everything that decides how text becomes ids: vocabulary, merges, normalizer, specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True)
    return hashlib.sha256((state + specials).encode()).hexdigest()


def token_settings(renderer: Renderer, fmt: str, fields: dict) -> dict:
    """The settings, besides the examples, that decide the tokens of a split (part of the cache key)."""
    code = hashlib.sha256()
    for source in (templating.__file__, __file__):  # the code that turns examples into rows
        code.update(Path(source).read_bytes())
    return {
        "version": CACHE_VERSION,
        "code": code.hexdigest(),
        "format": fmt,
        "fields": fields,
        "max_seq_len": renderer.max_seq_len,
        "train_on_prompt": bool(renderer.train_on_prompt),
        "template": renderer.template or "",
        "tokenizer": tokenizer_hash(renderer.tokenizer),
        "adds_bos": renderer.adds_bos,
        "stop_strings": renderer.stop_strings,
    }


def cache_key(settings: dict, split: str, examples: list[dict], records: list[Record]) -> str:
    """sha256 of the settings, the split name and every example with where it came from."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(f"\0{split}\0".encode())
    for example, record in zip(examples, records):
        h.update(json.dumps([record.where, example], sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_dir() -> Path:
    from lora_exp.model.load import cache_root

    return cache_root() / "data"


def tokenize_split(
    renderer: Renderer, examples: list[dict], records: list[Record], split: str, settings: dict, cache: bool = True
) -> Split:
    """The split's rows, from the cache when an entry for exactly these inputs exists, else built (and stored)."""
    key = cache_key(settings, split, examples, records) if cache else None
    if key:
        hit = _load(key, split)
        if hit is not None:
            for message in hit.warnings:
                log.warning("%s", message)
            return hit
    result = _build(renderer, examples, records, split)
    if key:
        _store(key, split, result)
    return result


# ---- building --------------------------------------------------------------------------------------
def _encode_one(item: dict, renderer: Renderer) -> dict:
    """One example as token ids and labels; any failure names the record."""
    where = item["where"]
    try:
        row = renderer.encode(json.loads(item["example"]))
        renderer.check(row)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # a template that cannot render this record (jinja errors and the like)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{where}: cannot render with the chat template ({type(e).__name__}: {msg})") from None
    return {"input_ids": row.input_ids, "labels": row.labels, "truncated": row.truncated, "n_sup": row.n_supervised}


def num_proc(n_examples: int) -> int | None:
    """Worker processes for tokenizing ``n_examples``: several for a large split, none (in-process) otherwise."""
    if n_examples <= MULTIPROCESS_MIN_EXAMPLES:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = min(cpus, MAX_PROCESSES)
    return n if n > 1 else None


def _build(renderer: Renderer, examples: list[dict], records: list[Record], split: str) -> Split:
    """Tokenize with ``datasets.map``: a progress bar, and ``num_proc`` workers on a large split."""
    import datasets

    if not examples:
        return Split([])
    said: list[str] = []
    capture = _Capture(said)
    data_log = logging.getLogger("lora_exp.data")
    data_log.addHandler(capture)
    try:
        # the first example in this process: its errors and template warnings come before any worker starts
        _encode_one({"example": json.dumps(examples[0]), "where": records[0].where}, renderer)
        table = datasets.Dataset.from_dict(
            {"example": [json.dumps(e, ensure_ascii=False) for e in examples], "where": [r.where for r in records]}
        )
        procs = num_proc(len(examples))
        mapped = table.map(
            _encode_one,
            fn_kwargs={"renderer": renderer},
            remove_columns=["example"],
            num_proc=procs,
            desc=f"tokenizing {split} ({len(examples)} examples{f', {procs} processes' if procs else ''})",
            new_fingerprint=f"lora-exp-{split}-{uuid.uuid4().hex}",  # no hashing of the tokenizer by datasets
            keep_in_memory=True,
        )
        result = _finish(mapped.to_list(), split, renderer.max_seq_len)
    finally:
        data_log.removeHandler(capture)
    result.warnings = said  # the template's warnings and _finish's, in the order they were said
    return result


def _finish(encoded: list[dict], split: str, max_len: int) -> Split:
    """Drop rows with nothing to learn, count truncation; an unusable split is an error."""
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "truncated": e["truncated"]} for e in encoded]
    kept = [r for r, e in zip(rows, encoded) if e["n_sup"] > 0]
    truncated = sum(e["truncated"] for e in encoded)
    first_dropped = next((e["where"] for e in encoded if e["n_sup"] == 0), None)
    if truncated == len(encoded):
        raise DataError(
            f"every {split} example ({len(encoded)}) is longer than data.max_seq_len={max_len} tokens; "
            f"raise data.max_seq_len"
        )
    if not kept:
        raise DataError(
            f"no {split} example has a supervised token left within data.max_seq_len={max_len} (first: {first_dropped})"
        )
    if truncated:
        log.warning("%d of %d %s examples truncated to data.max_seq_len=%d", truncated, len(encoded), split, max_len)
    if len(kept) < len(rows):
        log.warning(
            "%d %s examples dropped: no supervised token within data.max_seq_len=%d (first: %s)",
            len(rows) - len(kept),
            split,
            max_len,
            first_dropped,
        )
    return Split(kept, truncated, len(rows) - len(kept))


class _Capture(logging.Handler):
    """Keeps the warnings said while a split is built, so a cache hit can say them again."""

    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


# ---- the cache -------------------------------------------------------------------------------------
def _load(key: str, split: str) -> Split | None:
    folder = cache_dir() / key
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        import datasets

        meta = json.loads(meta_file.read_text())
        if meta.get("key") != key:
            raise ValueError("key mismatch")
        rows = datasets.load_from_disk(str(folder / "rows")).to_list()
        if len(rows) != meta["rows"]:
            raise ValueError(f"{len(rows)} rows, meta says {meta['rows']}")
    except Exception as e:  # an entry damaged after it was written: rebuild it
        log.warning("data cache: ignoring the unreadable entry %s (%s: %s)", folder, type(e).__name__, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    log.info("data cache: loaded %d tokenized %s rows from %s (no tokenization)", len(rows), split, folder)
    return Split(rows, meta["truncated"], meta["dropped"], meta["warnings"])


def _store(key: str, split: str, result: Split) -> None:
    """Write the entry into a temporary folder, then rename it into place (atomic on one file system)."""
    import datasets

    root = cache_dir()
    tmp = root / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _prune_stale(root)
        quiet = not datasets.are_progress_bars_disabled()
        if quiet:  # a second bar for a save that takes a blink is noise
            datasets.disable_progress_bars()
        try:
            datasets.Dataset.from_list(result.rows).save_to_disk(str(tmp / "rows"))
        finally:
            if quiet:
                datasets.enable_progress_bars()
        meta = {
            "key": key,
            "split": split,
            "rows": len(result.rows),
            "truncated": result.truncated,
            "dropped": result.dropped,
            "warnings": result.warnings,
            "written": time.time(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.rename(tmp, root / key)
    except OSError as e:
        if (root / key / "meta.json").is_file():  # another run stored the same entry first
            log.info("data cache: %s already stored by another run", split)
        else:
            log.warning("data cache: could not store the tokenized %s split under %s (%s)", split, root, e)
    else:
        log.info("data cache: stored the tokenized %s split in %s", split, root / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_stale(root: Path) -> None:
    """Remove temporary folders left by runs killed while storing an entry."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
