"""The frozen base model as a row of its own, and each configuration's difference from it.

Every run measures the untrained base model on its held-out split before training (``base/val/*``
in ``metrics.json``). The report shows that measurement as a reference row, "base model (no
training)": one row per distinct base model and evaluation data (runs grouped by their model,
quantisation and model fingerprint, and the data fingerprint), its statistics over the runs that
measured it. It is never a candidate for "best" and takes no part in the tests between
configurations; each configuration is compared with it by the per-run difference
``val/<metric> - base/val/<metric>`` (each run against its own base measurement, so the pairing
is exact), with a t-interval and a one-sample t-test.
"""

from __future__ import annotations

import math
from typing import Any

from lora_exp import metrics as M
from lora_exp.reporting.collect import RunResult, aggregate, group_runs, number
from lora_exp.runs.rundir import RunDir

METHOD = "method"  # the configuration key (``method=lora|full``), and the tables' row-kind column
BASE = "base"  # ``method`` of a base row in baselines.csv
BASE_LABEL = "base model (no training)"
METHOD_LABELS = {"lora": "LoRA", "full": "full fine-tuning", BASE: BASE_LABEL}
VS_BASE = "vs_base"  # results.csv: ``val/loss:vs_base:diff`` ...
# "runs", not "n": a ``<metric>:<stat>`` column name is the per-configuration statistics' (collect.STATS)
VS_BASE_FIELDS = ("runs", "diff", "diff_ci_lo", "diff_ci_hi", "p")
# configuration columns that can describe a base row (the others are training settings)
_BASE_KEYS = ("model", "data", "quant")


def method_label(value: Any) -> str:
    """How the tables name a method: ``LoRA``, ``full fine-tuning``, ``base model (no training)``."""
    return METHOD_LABELS.get(str(value), str(value))


def base_identity(run: RunResult) -> tuple[str, str, str]:
    """``(model, model fingerprint, data fingerprint)``: runs sharing it measured the same base on the same data."""
    d = RunDir(run.path)
    info = d.run_json()
    choices = d.group_choices()
    model = choices.get("model")
    if model is None:
        try:
            model = d.config().get("model", {}).get("name")
        except Exception:  # no readable config: the fingerprints still tell bases apart
            model = None
    model = str(model or "model")
    if choices.get("quant") not in (None, "none"):
        model += f" ({choices['quant']})"  # a quantised base is another model
    fp = info.get("model_fingerprint") or {}
    model_hash = fp.get("sha256") or (f"{fp['hub_id']}@{fp.get('revision')}" if fp.get("hub_id") else "")
    data = run.metrics.get(M.DATA_FINGERPRINT) or info.get("data_fingerprint") or ""
    return model, str(model_hash), str(data)


def base_metrics(runs: list[RunResult]) -> list[str]:
    """The held-out metrics (``val/loss``, ...) whose base value at least one run recorded."""
    return [m for m in M.VAL_METRICS if any(number(r.metrics.get(M.base(m))) is not None for r in runs)]


def base_table(runs: list[RunResult], cols: list[str]):
    """One row per distinct base: ``method=base``, its label, n, ``<metric>:<stat>`` of ``base/<metric>``.

    The statistics sit under the plain metric names (``val/loss:mean``), so the row lines up with
    the configuration rows; the ``method`` column says what it is. A run counts when it recorded
    the base measurement, whatever happened to its training afterwards.
    """
    import pandas as pd

    metrics = base_metrics(runs)
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        if any(number(r.metrics.get(M.base(m))) is not None for m in metrics):
            groups.setdefault(base_identity(r), []).append(r)
    models = {k[0] for k in groups}
    datas = {k[2] for k in groups}
    rows = []
    for (model, _, data), members in groups.items():
        label = (
            BASE_LABEL + (f": {model}" if len(models) > 1 else "") + (f", data {data[:8]}" if len(datas) > 1 else "")
        )
        row: dict[str, Any] = {}
        for c in cols:
            values = {str(m.config.get(c)) for m in members}
            shared = c.split(".")[0] in _BASE_KEYS and len(values) == 1
            row[c] = members[0].config.get(c) if shared else None
        row.update({METHOD: BASE, "label": label})
        row["base model"], row["data fingerprint"] = model, data
        row["n"], row["n_failed"] = len(members), 0
        row["seeds"] = " ".join(str(r.seed) for r in members)
        for m in metrics:
            values = [v for v in (number(r.metrics.get(M.base(m))) for r in members) if v is not None]
            for stat, value in aggregate(values).items():
                row[f"{m}:{stat}"] = value
        row["run_dirs"] = ";".join(str(r.path) for r in members)
        rows.append(row)
    return pd.DataFrame(rows)


def vs_base(runs: list[RunResult], cols: list[str]):
    """Per configuration row (``results_table`` order) and metric: the per-run difference from the base.

    Columns ``<metric>:vs_base:<field>``: runs (completed runs with both values), diff (mean of
    ``val - base``), its 95% t-interval, and the one-sample t-test's p (NaN below two runs or
    with no spread).
    """
    import pandas as pd
    from scipy import stats

    metrics = base_metrics(runs)
    rows = []
    for members in group_runs(runs, cols):
        row: dict[str, Any] = {}
        for m in metrics:
            diffs = []
            for r in members:
                after, before = number(r.metrics.get(m)), number(r.metrics.get(M.base(m)))
                if r.ok and after is not None and before is not None:
                    diffs.append(after - before)
            agg = aggregate(diffs)
            p = math.nan
            if len(diffs) >= 2 and agg["std"] > 0:
                p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
            values = (agg["n"], agg["mean"], agg["ci95_lo"], agg["ci95_hi"], p)
            row.update({f"{m}:{VS_BASE}:{f}": v for f, v in zip(VS_BASE_FIELDS, values)})
        rows.append(row)
    return pd.DataFrame(rows)


def vs_base_rows(df, vs, cols: list[str], metrics: list[str], fmt, label) -> tuple[list[str], list[list[str]]]:
    """The difference from the base as a reader's table: configuration, then ``Δ [95% CI]`` per metric."""
    shown = [m for m in metrics if f"{m}:{VS_BASE}:diff" in vs]
    header = ["configuration", *(f"Δ {m}" for m in shown)]
    cells = []
    for i in df.index:
        line = [label(df.loc[i], cols)]
        for m in shown:
            d = vs.at[i, f"{m}:{VS_BASE}:diff"]
            lo, hi = vs.at[i, f"{m}:{VS_BASE}:diff_ci_lo"], vs.at[i, f"{m}:{VS_BASE}:diff_ci_hi"]
            text = fmt(d, m)
            if not (math.isnan(lo) or math.isnan(hi)):
                text += f" [{fmt(lo, m)}, {fmt(hi, m)}]"
            line.append(text)
        cells.append(line)
    return header, cells


def vs_base_long(df, vs, cols: list[str], label):
    """The differences from the base as rows of ``comparisons.csv`` (reference ``base``)."""
    import pandas as pd

    rows = []
    for m in base_metrics_of(vs):
        for i in df.index:
            rows.append(
                {
                    "metric": m,
                    "reference": BASE,
                    "configuration": label(df.loc[i], cols),
                    "against": BASE_LABEL,
                    "mean": df.at[i, f"{m}:mean"] if f"{m}:mean" in df else math.nan,
                    "test": "one-sample t on per-run differences",
                    "n": vs.at[i, f"{m}:{VS_BASE}:runs"],
                    **{f: vs.at[i, f"{m}:{VS_BASE}:{f}"] for f in VS_BASE_FIELDS[1:]},
                }
            )
    return pd.DataFrame(rows)


def base_metrics_of(vs) -> list[str]:
    """The metrics a ``vs_base`` frame holds, in its column order."""
    return list(dict.fromkeys(c.split(f":{VS_BASE}:")[0] for c in vs.columns))
