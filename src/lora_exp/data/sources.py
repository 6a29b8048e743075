"""Where records come from: local JSONL / JSON / CSV / Parquet files, hub data sets, built-in tasks.

Local text formats are read with the standard library, line by line, so that a malformed line is
reported as ``file:line`` (``datasets``' JSON builder reports a pyarrow error without the line);
Parquet goes through pyarrow. Hub data sets go through ``datasets.load_dataset``. Every record
keeps where it came from, so later errors (a missing field) can name the file and line too.
Text files must be UTF-8 (a leading byte-order mark is allowed); other bytes are a ``DataError``
naming the line and the byte offset in the file, never a ``UnicodeDecodeError`` traceback.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_exp.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Record:
    """One raw example and where it came from (``file:line`` or ``hub[split] row N``)."""

    data: dict[str, Any]
    where: str
    source: str = ""  # the file or data set, for warnings given once per file
    pos: int = 0  # line or row number inside ``source``, to name the first of several records


def read_file(path: str | Path, label: str = "data.train_path") -> list[Record]:
    """Read every record of a local data file; a clear ``DataError`` for anything unreadable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{label}={path}: file not found" if not p.exists() else f"{label}={path}: not a file")
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{label}={path}: unknown file type {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    records = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind](p)
    if not records:
        raise DataError(f"{p}: empty file (no examples)")
    return records


def read_text(p: Path) -> str:
    """The file as text; bytes that are not UTF-8 are a ``DataError`` naming the line and byte offset."""
    data = p.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{p}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at byte offset {offset}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_jsonl(p: Path, text: str | None = None) -> list[Record]:
    records = []
    # split on "\n" only: str.splitlines would also split on U+2028 and friends, which JSON strings may hold
    for lineno, line in enumerate((read_text(p) if text is None else text).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(Record(obj, f"{p}:{lineno}", str(p), lineno))
    return records


def _read_json(p: Path) -> list[Record]:
    text = read_text(p)
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines with a .json suffix
            return _read_jsonl(p, text)
        raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if isinstance(obj, dict):  # {"data": [...]}, {"train": [...]}: the one list of records inside
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{p}: expected a list of records (or an object holding one list), got keys {list(obj)}")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a list of records, got {type(obj).__name__}")
    records = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{p}: record {i}: expected a JSON object, got {type(item).__name__}")
        records.append(Record(item, f"{p}: record {i}", str(p), i))
    return records


def _read_csv(p: Path) -> list[Record]:
    records = []
    reader = csv.DictReader(io.StringIO(read_text(p), newline=""))
    try:
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError(f"{p}:{reader.line_num}: more values than the header has columns")
            records.append(Record(dict(row), f"{p}:{reader.line_num}", str(p), reader.line_num))
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: malformed CSV ({e})") from None
    return records


def _read_parquet(p: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{p}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return [Record(r, f"{p}: row {i}", str(p), i) for i, r in enumerate(rows)]


def load_hub(name: str, config: str | None, split: str) -> list[Record]:
    """Records of one split of a hub data set; offline or unreachable is a clear error."""
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        flags = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
        offline = [v for v in flags if os.environ.get(v, "").lower() in ("1", "true", "yes")]
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        how = "or export it to a JSONL file and use data=jsonl data.train_path=FILE"
        if offline:
            raise DataError(
                f"data.hub_name={name}: not in the local datasets cache and {'/'.join(offline)} is set (offline); "
                f"download it once with network access, {how}"
            ) from None
        raise DataError(f"data.hub_name={name} (split {split!r}) cannot be loaded: {msg}; {how}") from None
    return [Record(dict(r), f"{name}[{split}] row {i}", f"{name}[{split}]", i) for i, r in enumerate(ds)]


def held_out_split(records: list, val_size: float | int, seed: int) -> tuple[list, list]:
    """Split off a held-out set deterministically (independent of the training seed).

    Args:
        val_size: a count (int >= 1) or a fraction in (0, 1).
        seed: ``data.split_seed``; the same file and seed always give the same split.
    """
    n = len(records)
    k = int(val_size) if isinstance(val_size, int) or val_size >= 1 else max(1, round(n * float(val_size)))
    if k >= n:
        raise DataError(f"data.val_size={val_size}: leaves no training example out of {n}")
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    val_idx = set(order[:k])
    return [r for i, r in enumerate(records) if i not in val_idx], [records[i] for i in sorted(val_idx)]
