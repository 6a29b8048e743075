"""The run directory's records: ``metrics.json`` with flat keys and a status."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_exp import metrics as M

METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_metrics(run_dir: Path, status: str, values: dict[str, Any]) -> dict[str, Any]:
    """Record ``values`` and the run ``status`` in ``run_dir/metrics.json``."""
    data = {**values, M.STATUS: status}
    write_json(Path(run_dir) / METRICS_FILE, data)
    return data


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())
