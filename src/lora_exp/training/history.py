"""The run's metric history: every logged metric, one JSON line per logging call (``history.jsonl``).

Written for every run whatever the loggers: reports draw loss curves and ``best/*`` values from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lora_exp import metrics as M
from lora_exp.runs.rundir import HISTORY_FILE


class HistoryLogger(Logger):
    """Every logged metric, one JSON line per logging call, in ``run_dir/history.jsonl``.

    Always on (whatever ``logger=`` says) so reports can draw loss curves from local files alone,
    and so the run record gets the best value each metric reached.
    """

    def __init__(self, run_dir: str | Path, append: bool = False):
        """``append``: keep the rows already there (a resumed run); otherwise start an empty file."""
        super().__init__()
        self.path = Path(run_dir) / HISTORY_FILE
        self.rows: list[dict[str, Any]] = read_history(run_dir) if append else []
        if rank_zero_only.rank == 0 and not append:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def best(self) -> dict[str, float]:
        """``best/<metric>``: the best value each metric with a known direction reached (``M.GOALS``)."""
        out = {}
        for key, goal in M.GOALS.items():
            values = [r[key] for r in self.rows if key in r and math.isfinite(r[key])]
            if values:
                out[M.best(key)] = min(values) if goal == "min" else max(values)
        return out

    def last(self, key: str) -> float | None:
        values = [r[key] for r in self.rows if key in r]
        return values[-1] if values else None


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows a ``HistoryLogger`` wrote; empty when the run has none."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
