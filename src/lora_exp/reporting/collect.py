"""Reading a sweep's run directories into configurations, seeds and per-configuration statistics.

A run directory is any folder holding ``metrics.json``. A configuration is identified by the values
of the keys any run overrode (seed excepted) plus the method (``lora`` or ``full``), rank, alpha and
target modules, read from each run's own ``.hydra`` files; runs of one configuration are its
seeds. A full fine-tune has no rank, alpha or target modules (None). In a tuned sweep
(``tuning.json``) only the replicates at each configuration's chosen rate are runs of the report,
and the learning rate is the tuning's outcome, not a configuration key (see ``tuning``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_exp import metrics as M
from lora_exp.errors import ReportError
from lora_exp.runs.rundir import METRICS_FILE, RunDir

REPORT_DIR = "report"
STATS = ("n", "mean", "std", "ci95_lo", "ci95_hi")
# configuration columns always shown (when the runs have them), in this order
LORA_KEYS = ("lora.r", "lora.alpha", "lora.target_modules")
METHOD = "method"  # lora or full (``method=full``): a column when the runs mix them
LR = "optim.lr"
SEED = "seed"
SKIP_DIRS = {REPORT_DIR, ".submitit", "wandb", "adapter", "checkpoints", ".hydra", "csv"}
# per-run compute keys summed per configuration and over the sweep, when runs record them
COMPUTE_PREFIX = "compute/"
COMPUTE_TOTALS = (M.COMPUTE_TRAIN_FLOPS, M.COMPUTE_DEVICE_HOURS)
TOTAL = "sum"  # the stat name of those sums: ``compute/train_flops:sum``
PER_RUN = "per_run"  # and of their mean over completed runs (not a ``STATS`` name: no CI is claimed)


@dataclass
class RunResult:
    """One run directory: its status, metrics, configuration values and seed."""

    path: Path
    status: str
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    seed: Any = None
    error: str | None = None
    method: str = "lora"
    tuning: Any = None  # (tuning.Tuning, its configuration entry) for a replicate of a tuned sweep

    @property
    def ok(self) -> bool:
        return self.status == M.STATUS_COMPLETED


def find_run_dirs(sweep_dirs: list[Path]) -> list[Path]:
    """Every directory under the sweep directories that holds a ``metrics.json`` (a run)."""
    found: list[Path] = []
    for root in sweep_dirs:
        if not root.is_dir():
            raise ReportError(f"{root}: no such directory")
        stack = [root]
        while stack:
            d = stack.pop()
            if (d / METRICS_FILE).is_file():
                found.append(d)
            stack.extend(sorted((c for c in d.iterdir() if c.is_dir() and c.name not in SKIP_DIRS), reverse=True))
    if not found:
        raise ReportError(f"no run directories ({METRICS_FILE}) under {', '.join(map(str, sweep_dirs))}")
    return sorted(dict.fromkeys(p.resolve() for p in found), key=_natural)


def _natural(path: Path) -> list:
    # (kind, number, text): a job number beside a named folder (sweep/3 vs sweep/more/0) must still compare
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.as_posix().replace("-", "/").split("/")]


def scalar(text: str) -> Any:
    """An override value as YAML reads it (``4`` -> 4, ``qv`` -> 'qv')."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, str, bool)) or value is None else text


def _overrides(run: RunDir) -> dict[str, Any]:
    out = {}
    for item in run.overrides():
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = scalar(value)
    return out


def _config_value(run: RunDir, key: str) -> Any:
    """A key of the run's composed config (``.hydra/config.yaml``), or its config-group choice."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(run.config(), key, throw_on_resolution_failure=False)
    except Exception:  # no or unreadable config: the value is unknown, the run still counts
        return None
    if OmegaConf.is_list(value):
        return ",".join(str(v) for v in value)
    if OmegaConf.is_dict(value):
        return run.group_choice(key)
    return value


def load_runs(sweep_dirs: list[Path]) -> list[RunResult]:
    """Read every run under ``sweep_dirs``; the configuration is every swept key except the seed.

    Keys that never vary across the runs are dropped, except rank, alpha and target modules
    (they name the setup). In a tuned sweep the search runs are left out and ``optim.lr`` is not
    a key of the replicates (each configuration's rate is its tuning's choice).
    """
    from lora_exp.reporting import tuning

    found = find_run_dirs(sweep_dirs)
    tuned = tuning.select(sweep_dirs, found)
    dirs = [RunDir(d) for d in found if d not in tuned.excluded]
    overrides = {d: _overrides(d) for d in dirs}
    for d in dirs:
        if d.path in tuned.entry:
            overrides[d].pop(LR, None)  # set per job by the sweeper: the outcome, shown as `tuned lr`
    keys = [METHOD, *LORA_KEYS]
    for o in overrides.values():
        keys += [k for k in o if k not in keys and k != SEED and not k.startswith("hydra.")]
    runs = []
    for d in dirs:
        try:
            record = d.metrics()
        except (OSError, ValueError) as e:
            record = {M.STATUS: "unreadable", M.ERROR: f"{METRICS_FILE}: {e}"}
        config = {k: overrides[d][k] if k in overrides[d] else _config_value(d, k) for k in keys}
        config[METHOD] = str(config[METHOD] or record.get(METHOD) or "lora")  # runs before method=: LoRA
        if config[METHOD] != "lora":  # no adapter: rank, alpha, targets and every other lora.* do not apply
            config.update(dict.fromkeys(k for k in config if k.startswith("lora.")))
        seed = overrides[d].get(SEED, _config_value(d, SEED))
        # RunDir's status: a `running` record whose process is gone reads as interrupted
        status = d.status() or str(record.get(M.STATUS, "unknown"))
        result = RunResult(d.path, status, record, config, seed, record.get(M.ERROR), config[METHOD])
        result.tuning = tuned.entry.get(d.path)
        runs.append(result)
    varying = {k for k in keys if len({json.dumps(r.config[k], default=str) for r in runs}) > 1}
    for r in runs:
        r.config = {k: v for k, v in r.config.items() if k in varying or (k in LORA_KEYS and v is not None)}
    return runs


def t_quantile(n: int) -> float:
    """The two-sided 95% Student-t quantile for ``n`` samples (``n - 1`` degrees of freedom)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def aggregate(values: list[float]) -> dict[str, float]:
    """n, mean, sample std and the 95% t-interval of the mean (NaN where n is too small)."""
    import numpy as np

    n = len(values)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "ci95_lo": nan, "ci95_hi": nan}
    mean = float(np.mean(values))
    if n == 1:
        return {"n": 1, "mean": mean, "std": nan, "ci95_lo": nan, "ci95_hi": nan}
    std = float(np.std(values, ddof=1))
    half = t_quantile(n) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95_lo": mean - half, "ci95_hi": mean + half}


def config_columns(runs: list[RunResult]) -> list[str]:
    cols: list[str] = []
    for r in runs:
        cols += [k for k in r.config if k not in cols]
    return cols


def report_metrics(runs: list[RunResult]) -> list[str]:
    """The metrics of ``M.REPORT_METRICS`` that at least one completed run recorded as a number."""
    return [k for k in M.REPORT_METRICS if any(number(r.metrics.get(k)) is not None for r in runs if r.ok)]


def compute_keys(runs: list[RunResult]) -> list[str]:
    """The ``compute/*`` keys any run recorded as a number (none for runs that predate compute accounting)."""
    keys = {k for r in runs for k, v in r.metrics.items() if k.startswith(COMPUTE_PREFIX) and number(v) is not None}
    return sorted(keys)


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN and inf are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def config_key(config: dict[str, Any], cols: list[str]) -> tuple:
    return tuple(json.dumps(config.get(c), default=str) for c in cols)


def config_label(row, cols: list[str]) -> str:
    """``r=8, alpha=16, target_modules=qv``: a configuration in a few characters (unset keys left out)."""
    return ", ".join(f"{c.split('.')[-1]}={plain_value(row.get(c))}" for c in cols if not _unset(row.get(c)))


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def plain_value(value: Any) -> Any:
    """8.0 -> 8: a column holding None beside integers is float in pandas."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def group_runs(runs: list[RunResult], cols: list[str]) -> list[list[RunResult]]:
    """Runs grouped by configuration, in the report's row order (configuration values ascending)."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(config_key(r.config, cols), []).append(r)
    return sorted(groups.values(), key=lambda g: tuple(_sort_key(g[0].config.get(c)) for c in cols))


def _sort_key(value: Any):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def seed_values(members: list[RunResult], metric: str) -> tuple[list[Any], list[float]]:
    """Seeds and values of ``metric`` over a configuration's completed runs that recorded it."""
    pairs = [(r.seed, number(r.metrics.get(metric))) for r in members if r.ok]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def results_table(runs: list[RunResult]):
    """The per-configuration DataFrame: config columns, counts, ``<metric>:<stat>``, run directories.

    With compute keys recorded, ``compute/train_flops:sum`` and ``compute/device_hours:sum`` are the
    configuration's totals over all its runs (failed ones spent compute too), ``:per_run`` the
    mean over its completed runs. Rows of a tuned sweep have ``tuned lr`` (the chosen rate) and
    ``lr candidates`` (every candidate's score, JSON).
    """
    import pandas as pd

    from lora_exp.reporting import tuning

    cols = config_columns(runs)
    metrics = report_metrics(runs)
    totals = [k for k in COMPUTE_TOTALS if k in compute_keys(runs)]
    tuned = any(r.tuning for r in runs)
    rows = []
    for members in group_runs(runs, cols):
        ok = [r for r in members if r.ok]
        row: dict[str, Any] = {c: members[0].config.get(c) for c in cols}
        row.setdefault(METHOD, members[0].method)  # a column even when every run shares it
        if tuned:
            row.update(tuned_columns(members, tuning))
        row["n"] = len(ok)
        row["n_failed"] = len(members) - len(ok)
        row["seeds"] = " ".join(str(r.seed) for r in ok)
        for m in metrics:
            for stat, value in aggregate(seed_values(members, m)[1]).items():
                row[f"{m}:{stat}"] = value
        for k in totals:
            row[f"{k}:{TOTAL}"] = sum(number(r.metrics.get(k)) or 0.0 for r in members)
            row[f"{k}:{PER_RUN}"] = aggregate(seed_values(members, k)[1])["mean"]
        row["run_dirs"] = ";".join(str(r.path) for r in members)
        rows.append(row)
    return pd.DataFrame(rows)


def tuned_columns(members: list[RunResult], tuning) -> dict[str, Any]:
    """``tuned lr`` and ``lr candidates`` of one configuration (None for runs of an untuned sweep).

    Two tuned sweeps of one configuration can choose different rates: both are listed.
    """
    entries = {tuning.candidates_text(r.tuning[1]): r.tuning[1] for r in members if r.tuning}
    rates = list(dict.fromkeys(c.get("chosen_lr") for c in entries.values()))
    if not entries:
        return {tuning.TUNED_LR: None, tuning.CANDIDATES: None}
    lr = rates[0] if len(rates) == 1 else " / ".join(f"{x:g}" if x is not None else "none" for x in rates)
    return {tuning.TUNED_LR: lr, tuning.CANDIDATES: " / ".join(entries)}


def runs_table(runs: list[RunResult]):
    """One row per run directory: path, status, error, configuration, seed, raw metrics and compute."""
    import pandas as pd

    keys = report_metrics(runs) + [k for k in compute_keys(runs) if k not in M.REPORT_METRICS]
    rows = []
    for r in runs:
        row = {"run_dir": str(r.path), "status": r.status, **r.config, SEED: r.seed}
        row.update({k: number(r.metrics.get(k)) for k in keys})
        row[M.ERROR] = r.error or ""
        rows.append(row)
    return pd.DataFrame(rows)


def stat_columns(df) -> list[tuple[str, str]]:
    """``(metric, stat)`` for every ``<metric>:<stat>`` column of a results table.

    Comparison columns (``<metric>:vs_best:<field>``, ``<metric>:vs_base:<field>``) are not stats of a metric.
    """
    out = []
    for c in df.columns:
        metric, sep, stat = str(c).rpartition(":")
        if sep and stat in STATS and ":" not in metric:
            out.append((metric, stat))
    return out
