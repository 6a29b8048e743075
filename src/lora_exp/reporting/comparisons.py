"""Every configuration against the best one (and a named baseline), for each metric with a direction.

The statistics are in ``stats``; this module feeds it the report's rows (seeds and values read by
``collect``) and lays the results out for ``results.csv`` (wide columns), ``comparisons.csv``, the
tables' marks and the W&B summary run (one long table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_exp import metrics as M
from lora_exp.reporting import stats
from lora_exp.reporting.collect import ReportError, RunResult, config_label, group_runs, scalar, seed_values

# the columns a comparison adds to results.csv, per metric and reference: ``val/loss:vs_best:p_holm``
FIELDS = ("test", "diff", "diff_ci_lo", "diff_ci_hi", "p", "p_holm", "p_wilcoxon", "effect", "seeds_80", "mark")
VS_BEST, VS_BASELINE = "vs_best", "vs_baseline"


@dataclass
class Comparisons:
    """The comparisons of one report: per metric, a ``stats.compare`` frame against each reference."""

    alpha: float
    by_ref: dict[str, dict[str, Any]] = field(default_factory=dict)  # reference -> metric -> DataFrame
    baseline_row: int | None = None

    def get(self, metric: str, ref: str = VS_BEST):
        return self.by_ref.get(ref, {}).get(metric)

    def mark(self, metric: str, row: int, ref: str = VS_BEST) -> str:
        frame = self.get(metric, ref)
        return "" if frame is None else str(frame.at[row, "mark"])


def compared_metrics(metrics: list[str]) -> list[str]:
    """The metrics with a direction of "better"; ``base/`` ones measure the same base model in every row."""
    return [m for m in metrics if M.goal(m) and not m.startswith(M.BASE_PREFIX)]


def find_baseline(df, cols: list[str], spec: list[str] | None) -> int | None:
    """The row of ``results_table`` named by ``KEY=VALUE`` items; a clear error unless exactly one matches."""
    if not spec:
        return None
    wanted = {}
    for item in spec:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ReportError(f"--baseline {item}: expected KEY=VALUE, e.g. --baseline lora.r=8")
        if key not in cols:
            raise ReportError(f"--baseline {item}: {key} is not a configuration column; expected one of {cols}")
        wanted[key] = scalar(value)
    match = [i for i in df.index if all(_same(df.at[i, k], v) for k, v in wanted.items())]
    if len(match) != 1:
        rows = "; ".join(config_label(df.loc[i], cols) for i in (match or df.index))
        what = "matches no configuration" if not match else "matches several configurations (add keys)"
        raise ReportError(f"--baseline {' '.join(spec)} {what}: {rows}")
    return match[0]


def _same(value: Any, wanted: Any) -> bool:
    return value == wanted or str(value) == str(wanted)


def compare_runs(runs: list[RunResult], cols: list[str], metrics: list[str], baseline_row=None, alpha=stats.ALPHA):
    """Run ``stats.compare`` for every metric in ``metrics`` against the best row and the baseline row."""
    groups = group_runs(runs, cols)
    out = Comparisons(alpha=alpha, baseline_row=baseline_row)
    refs = {VS_BEST: None} | ({VS_BASELINE: baseline_row} if baseline_row is not None else {})
    for m in compared_metrics(metrics):
        samples = [stats.Sample.of(*seed_values(members, m)) for members in groups]
        if sum(s.n > 0 for s in samples) < 2:
            continue  # nothing to compare with
        for ref, row in refs.items():
            out.by_ref.setdefault(ref, {})[m] = stats.compare(samples, M.goal(m), reference=row, alpha=alpha)
    return out


def add_columns(df, comparisons: Comparisons):
    """``results.csv``'s comparison columns, ``<metric>:<reference>:<field>``, beside the statistics."""
    import pandas as pd

    extra = {}
    for ref, frames in comparisons.by_ref.items():
        for m, frame in frames.items():
            for f in FIELDS:
                extra[f"{m}:{ref}:{f}"] = frame[f].to_numpy()
    if not extra:
        return df
    return pd.concat([df, pd.DataFrame(extra, index=df.index)], axis=1)


def long_table(df, cols: list[str], comparisons: Comparisons, metrics=None):
    """One row per (metric, reference, configuration): the comparisons as a reader scans them."""
    import pandas as pd

    rows = []
    for ref, frames in comparisons.by_ref.items():
        for m, frame in frames.items():
            if metrics is not None and m not in metrics:
                continue
            ref_row = comparisons.baseline_row if ref == VS_BASELINE else _first(frame, stats.BEST)
            for i in df.index:
                rows.append(
                    {
                        "metric": m,
                        "reference": ref.removeprefix("vs_"),
                        "configuration": config_label(df.loc[i], cols),
                        "against": config_label(df.loc[ref_row], cols) if ref_row is not None else "",
                        "mean": df.at[i, f"{m}:mean"],
                        **{f: frame.at[i, f] for f in ("n", *FIELDS)},
                    }
                )
    return pd.DataFrame(rows)


def _first(frame, mark: str):
    hits = frame.index[frame["mark"] == mark]
    return hits[0] if len(hits) else None
