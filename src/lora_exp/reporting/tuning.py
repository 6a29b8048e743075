"""Tuned grids (``hydra/sweeper=tuned``) in the report: which runs are rows, the chosen rate, the candidates.

The sweeper writes ``tuning.json`` in the sweep directory: the protocol in one sentence, and per
configuration the candidate rates with their scores, the chosen rate and the replicate run
directories. The search's runs at the other rates (and the halving rungs under ``tune/``) live
under the same sweep directory; they are the search, not results, so only the replicates become
rows. A configuration whose every candidate failed has no replicates: its search runs stay, so
the report shows it as failed rather than dropping it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_exp.errors import ReportError

TUNED_LR = "tuned lr"  # the results table's column of the chosen rate
CANDIDATES = "lr candidates"  # results.csv: the candidates' scores, {rate: score} as JSON


@dataclass
class Tuning:
    """One tuned sweep: its directory, protocol sentence, metric and per-configuration entries."""

    sweep_dir: Path
    protocol: str
    metric: str
    configs: list[dict[str, Any]]
    seeds: list[int] = field(default_factory=list)
    search_runs: int = 0  # run directories of the search found under the sweep directory (not rows)

    @property
    def file(self) -> Path:
        return self.sweep_dir / tuning_file_name()


@dataclass
class Selection:
    """The tuned sweeps under the report's directories, and which of their runs are rows."""

    tunings: list[Tuning] = field(default_factory=list)
    entry: dict[Path, tuple[Tuning, dict]] = field(default_factory=dict)  # row run dir -> its configuration
    excluded: set[Path] = field(default_factory=set)  # search runs: not rows

    def protocols(self, with_files: bool = True) -> list[str]:
        """One line per distinct protocol: the sweeper's sentence, the search runs left out, the file."""
        seen: dict[str, list[Tuning]] = {}
        for t in self.tunings:
            seen.setdefault(t.protocol, []).append(t)
        lines = []
        for protocol, ts in seen.items():
            search = sum(t.search_runs for t in ts)
            line = f"Protocol: {protocol}; the {search} search run(s) at the other rates are not rows"
            lines.append(line + (f" ({', '.join(str(t.file) for t in ts)})." if with_files else "."))
        return lines


def tuning_file_name() -> str:
    from hydra_plugins.lora_exp_tuned_sweeper.tuned_sweeper import TUNING_FILE

    return TUNING_FILE


def read_tuning(sweep_dir: Path) -> Tuning | None:
    """The ``tuning.json`` of ``sweep_dir`` or of the nearest folder above it; None if there is none."""
    name = tuning_file_name()
    for d in (sweep_dir, *sweep_dir.parents):
        path = d / name
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
                configs = [dict(c) for c in doc["configs"]]
                return Tuning(d, str(doc["protocol"]), str(doc["metric"]), configs, list(doc.get("seeds") or []))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ReportError(f"{path}: not a tuning record of hydra/sweeper=tuned ({e})") from e
    return None


def replicate_dirs(t: Tuning, c: dict) -> list[Path]:
    """The replicate run directories of configuration ``c``, resolved inside ``t.sweep_dir``.

    ``runs`` holds the paths as the sweep saw them (maybe relative to where it was started, maybe
    since moved); the last three parts (``<configuration>/lr=<rate>/seed=<seed>``) are the same
    wherever the sweep directory lies. Before the replicates ran, the paths are rebuilt the way the
    sweeper names them.
    """
    if c.get("chosen_lr") is None:
        return []
    runs = c.get("runs") or [f"{c['name']}/lr={float(c['chosen_lr']):g}/seed={s}" for s in t.seeds]
    return [(t.sweep_dir / Path(*Path(r).parts[-3:])).resolve() for r in runs]


def select(sweep_dirs: list[Path], run_dirs: list[Path]) -> Selection:
    """Which of ``run_dirs`` are rows: in a tuned sweep only the replicates (and searches that all failed)."""
    out = Selection()
    for root in sweep_dirs:
        t = read_tuning(Path(root).expanduser().resolve())  # run_dirs are resolved paths
        if t is None or any(t.sweep_dir == known.sweep_dir for known in out.tunings):
            continue
        out.tunings.append(t)
        by_config = {c["name"]: c for c in t.configs}
        for c in t.configs:
            for d in replicate_dirs(t, c):
                out.entry[d] = (t, c)
        for d in run_dirs:
            if d in out.entry or not d.is_relative_to(t.sweep_dir):
                continue
            c = by_config.get(d.relative_to(t.sweep_dir).parts[0])
            if c is not None and c.get("chosen_lr") is None:
                out.entry[d] = (t, c)  # every candidate failed: the failed search is the row
            else:
                out.excluded.add(d)
                t.search_runs += 1
    return out


def candidates_text(c: dict) -> str:
    """The candidates as JSON, ``{"1e-05": 2.31, "0.03": 1.02}`` (null: the run failed)."""
    return json.dumps({k: v for k, v in (c.get("candidates") or {}).items()})


def candidate_table(rows: list[tuple[str, Tuning, dict]], fmt) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cells and a bold mask (the chosen rate's score) of the candidates per configuration.

    Args:
        rows: ``(configuration label, tuning, configuration entry)`` per row of the results table.
        fmt: how a score of the tuning metric is written (``tables.fmt``).
    """
    rates = sorted({k for _, _, c in rows for k in (c.get("candidates") or {})}, key=float)
    header = ["configuration", "metric", *(f"lr={r}" for r in rates), TUNED_LR]
    cells, bold = [], []
    for label, t, c in rows:
        scores = c.get("candidates") or {}
        chosen = c.get("chosen_lr")
        line, mask = [label, t.metric], [False, False]
        for r in rates:
            line.append("-" if r not in scores else "failed" if scores[r] is None else fmt(scores[r], t.metric))
            mask.append(chosen is not None and r in scores and math.isclose(float(r), float(chosen)))
        line.append(f"{float(chosen):g}" if chosen is not None else "none (every candidate failed)")
        cells.append(line)
        bold.append([*mask, False])
    return header, cells, bold


def protocol_lines(runs, with_files: bool = True) -> list[str]:
    """One line per distinct tuning protocol among ``runs`` (naming the ``tuning.json`` it came from)."""
    selection = Selection(tunings=list({id(r.tuning[0]): r.tuning[0] for r in runs if r.tuning}.values()))
    return selection.protocols(with_files)


def row_entries(groups, cols: list[str], label) -> list[tuple[str, Tuning, dict]]:
    """``(configuration label, tuning, entry)`` per tuned configuration of ``groups`` (the results table's rows)."""
    out = []
    for members in groups:
        seen = {}
        for r in members:
            if r.tuning:
                seen.setdefault((str(r.tuning[0].sweep_dir), r.tuning[1]["name"]), r.tuning)
        for t, c in seen.values():
            out.append((label(members[0].config, cols), t, c))
    return out
