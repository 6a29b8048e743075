"""``python -m lora_exp.report SWEEP_DIR...``: a comparison report over a sweep's run directories.

Writes ``<first SWEEP_DIR>/report/`` (or ``--out``):

- ``results.csv``: one row per configuration, seeds aggregated: for every metric its number of
  runs, mean, sample std and 95% t-interval (columns ``<metric>:<stat>``), and the run
  directories each row was computed from;
- ``runs.csv``: one row per run directory (failed ones too) with its status and raw metrics;
- ``results.tex`` (booktabs, mean ± std, the best value of each column bold), ``report.md`` and a
  self-contained ``report.html`` (plots embedded);
- PNG plots: held-out metric vs rank per target set, a rank x alpha heatmap, loss curves per
  configuration, metric vs trainable parameters.

Everything comes from local files (``metrics.json``, ``.hydra/``, ``history.jsonl`` or the CSV
logger's ``metrics.csv``), so the report works offline and every number traces back to a run
directory. When logged in to W&B it also lists W&B runs of the sweep's group that are not on this
machine and creates a W&B Report for the group (``wandb-workspaces``); neither is needed offline.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_exp import metrics as M
from lora_exp.errors import UserError
from lora_exp.runs.rundir import METRICS_FILE

log = logging.getLogger(__name__)

REPORT_DIR = "report"
STATS = ("n", "mean", "std", "ci95_lo", "ci95_hi")
# configuration columns always shown (when the runs have them), in this order
LORA_KEYS = ("lora.r", "lora.alpha", "lora.target_modules")
SEED = "seed"
# the metrics of the LaTeX / Markdown tables (the CSV has every metric in M.REPORT_METRICS)
TABLE_METRICS = (M.VAL_LOSS, M.VAL_PPL, M.VAL_EXACT_MATCH, M.VAL_TOKEN_ACC, M.TRAINABLE_PARAMS)
SKIP_DIRS = {REPORT_DIR, ".submitit", "wandb", "adapter", "checkpoints", ".hydra", "csv"}


class ReportError(UserError):
    """The report cannot be built from the given directories."""


@dataclass
class RunResult:
    """One run directory: its status, metrics, configuration values and seed."""

    path: Path
    status: str
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    seed: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == M.STATUS_COMPLETED


# ---------------------------------------------------------------------------------------------
# reading run directories


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
    return [int(s) if s.isdigit() else s for s in path.as_posix().replace("-", "/").split("/")]


def _scalar(text: str) -> Any:
    """An override value as YAML reads it (``4`` -> 4, ``qv`` -> 'qv')."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, str, bool)) or value is None else text


def _overrides(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = _scalar(value)
    return out


def _config_value(run_dir: Path, key: str) -> Any:
    """A key of the run's composed config (``.hydra/config.yaml``), or its config-group choice."""
    from omegaconf import OmegaConf

    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        value = OmegaConf.select(OmegaConf.load(cfg_path), key, throw_on_resolution_failure=False)
    except Exception:
        return None
    if OmegaConf.is_list(value):
        return ",".join(str(v) for v in value)
    if OmegaConf.is_dict(value):
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        if hydra_file.is_file():
            return (OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices") or {}).get(key)
        return None
    return value


def load_runs(sweep_dirs: list[Path]) -> list[RunResult]:
    """Read every run under ``sweep_dirs``; the configuration is every swept key except the seed.

    A configuration is identified by the values of the keys any run overrode (seed excepted), plus
    rank, alpha and target modules, read from each run's own ``.hydra`` files.
    """
    dirs = find_run_dirs(sweep_dirs)
    overrides = {d: _overrides(d) for d in dirs}
    keys = [k for k in LORA_KEYS]
    for o in overrides.values():
        keys += [k for k in o if k not in keys and k != SEED and not k.startswith("hydra.")]
    runs = []
    for d in dirs:
        try:
            record = json.loads((d / METRICS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            record = {M.STATUS: "unreadable", M.ERROR: f"{METRICS_FILE}: {e}"}
        config = {k: overrides[d][k] if k in overrides[d] else _config_value(d, k) for k in keys}
        seed = overrides[d].get(SEED, _config_value(d, SEED))
        runs.append(RunResult(d, str(record.get(M.STATUS, "unknown")), record, config, seed, record.get(M.ERROR)))
    # keys that never vary carry no information, except the LoRA ones (they name the setup)
    varying = {k for k in keys if len({json.dumps(r.config[k], default=str) for r in runs}) > 1}
    for r in runs:
        r.config = {k: v for k, v in r.config.items() if k in varying or (k in LORA_KEYS and v is not None)}
    return runs


# ---------------------------------------------------------------------------------------------
# aggregation


def t_quantile(n: int) -> float:
    """The two-sided 95% Student-t quantile for ``n`` samples (``n - 1`` degrees of freedom)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def aggregate(values: list[float]) -> dict[str, float]:
    """n, mean, sample std and the 95% t-interval of the mean (NaN where n is too small)."""
    n = len(values)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "ci95_lo": nan, "ci95_hi": nan}
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": nan, "ci95_lo": nan, "ci95_hi": nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95_lo": mean - half, "ci95_hi": mean + half}


def config_columns(runs: list[RunResult]) -> list[str]:
    cols: list[str] = []
    for r in runs:
        cols += [k for k in r.config if k not in cols]
    return cols


def report_metrics(runs: list[RunResult]) -> list[str]:
    """The metrics of ``M.REPORT_METRICS`` that at least one completed run recorded as a number."""
    return [k for k in M.REPORT_METRICS if any(_number(r.metrics.get(k)) is not None for r in runs if r.ok)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _key(config: dict[str, Any], cols: list[str]) -> tuple:
    return tuple(json.dumps(config.get(c), default=str) for c in cols)


def results_table(runs: list[RunResult]):
    """The per-configuration DataFrame: config columns, counts, ``<metric>:<stat>``, run directories."""
    import pandas as pd

    cols = config_columns(runs)
    metrics = report_metrics(runs)
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(_key(r.config, cols), []).append(r)
    rows = []
    for members in groups.values():
        ok = [r for r in members if r.ok]
        row: dict[str, Any] = {c: members[0].config.get(c) for c in cols}
        row["n"] = len(ok)
        row["n_failed"] = len(members) - len(ok)
        row["seeds"] = " ".join(str(r.seed) for r in ok)
        for m in metrics:
            values = [v for v in (_number(r.metrics.get(m)) for r in ok) if v is not None]
            for stat, value in aggregate(values).items():
                row[f"{m}:{stat}"] = value
        row["run_dirs"] = ";".join(str(r.path) for r in members)
        rows.append(row)
    df = pd.DataFrame(rows)
    sort = [c for c in cols if c in df]
    if sort:
        df = df.sort_values(sort, key=lambda s: s.map(_sort_key)).reset_index(drop=True)
    return df


def _sort_key(value: Any):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def runs_table(runs: list[RunResult]):
    """One row per run directory: path, status, error, configuration, seed and raw metrics."""
    import pandas as pd

    metrics = report_metrics(runs)
    rows = []
    for r in runs:
        row = {"run_dir": str(r.path), "status": r.status, **r.config, SEED: r.seed}
        row.update({m: _number(r.metrics.get(m)) for m in metrics})
        row[M.ERROR] = r.error or ""
        rows.append(row)
    return pd.DataFrame(rows)


def stat_columns(df) -> list[tuple[str, str]]:
    """``(metric, stat)`` for every ``<metric>:<stat>`` column of a results table."""
    out = []
    for c in df.columns:
        metric, sep, stat = str(c).rpartition(":")
        if sep and stat in STATS:
            out.append((metric, stat))
    return out


# ---------------------------------------------------------------------------------------------
# formatting


def _fmt(value: float, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if metric in (M.TRAINABLE_PARAMS, M.TOTAL_PARAMS, M.STEPS) or metric.endswith("tokens"):
        return f"{value:,.0f}"
    if metric.endswith("ppl") or metric.endswith("tokens_per_s"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def _config_label(row, cols: list[str]) -> str:
    return ", ".join(f"{c.split('.')[-1]}={row[c]}" for c in cols)


def _best_index(df, metric: str):
    """The row with the best mean of ``metric`` (direction from ``M.GOALS``); None when nothing differs."""
    goal = M.GOALS.get(metric)
    col = f"{metric}:mean"
    if goal is None or col not in df or df[col].nunique(dropna=True) < 2:
        return None
    return df[col].idxmin() if goal == "min" else df[col].idxmax()


def _is_best(df, metric: str, i) -> bool:
    """Whether row ``i`` ties the best mean of ``metric`` (ties are all bold)."""
    best = _best_index(df, metric)
    return best is not None and df.at[i, f"{metric}:mean"] == df.at[best, f"{metric}:mean"]


def _latex_escape(text: Any) -> str:
    s = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


def to_latex(df, cols: list[str]) -> str:
    """A booktabs table: configuration, n, mean ± std of the main metrics; best per column bold."""
    metrics = [m for m in TABLE_METRICS if f"{m}:mean" in df]
    header = [_latex_escape(c.split(".")[-1]) for c in cols] + ["$n$"] + [_latex_escape(m) for m in metrics]
    lines = [
        "% generated by python -m lora_exp.report; rows: results.csv, runs: its run_dirs column",
        r"\begin{tabular}{" + "l" * len(cols) + "r" + "r" * len(metrics) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for i, row in df.iterrows():
        cells = [_latex_escape(row[c]) for c in cols] + [str(int(row["n"]))]
        for m in metrics:
            mean, std = row[f"{m}:mean"], row[f"{m}:std"]
            if math.isnan(mean):
                cells.append("--")
                continue
            text = _fmt(mean, m).replace(",", "{,}")
            if not math.isnan(std):
                text += r" $\pm$ " + _fmt(std, m).replace(",", "{,}")
            cells.append(r"\textbf{" + text + "}" if _is_best(df, m, i) else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def _summary_rows(df, cols: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the human-readable results table (mean ± std [95% CI])."""
    metrics = [m for m in TABLE_METRICS if f"{m}:mean" in df]
    header = cols + ["n", "failed"] + metrics
    rows = []
    for i, row in df.iterrows():
        cells = [str(row[c]) for c in cols] + [str(int(row["n"])), str(int(row["n_failed"]))]
        for m in metrics:
            mean, std = row[f"{m}:mean"], row[f"{m}:std"]
            text = _fmt(mean, m)
            if not math.isnan(std):
                text += f" ± {_fmt(std, m)} [{_fmt(row[f'{m}:ci95_lo'], m)}, {_fmt(row[f'{m}:ci95_hi'], m)}]"
            cells.append(f"**{text}**" if _is_best(df, m, i) else text)
        rows.append(cells)
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def _curves(run: RunResult) -> list[dict[str, Any]]:
    """A run's logged metrics over steps: ``history.jsonl``, else the CSV logger's ``metrics.csv``."""
    from lora_exp.training.loggers import read_history

    rows = read_history(run.path)
    if rows:
        return rows
    import csv

    for path in sorted(run.path.glob("csv/**/metrics.csv")):
        with path.open() as f:
            return [
                {k: float(v) for k, v in row.items() if v not in ("", None) and _is_float(v)}
                for row in csv.DictReader(f)
            ]
    return []


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def make_plots(df, runs: list[RunResult], cols: list[str], metric: str, out: Path) -> dict[str, str]:
    """Write the PNG plots; return ``{file name: caption}`` of those written."""
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", module="matplotlib")  # one-point axes etc.: the plot is still right
    written: dict[str, str] = {}
    df = df[df["n"] > 0]  # configurations whose runs all failed are listed, not plotted
    mean, lo, hi = f"{metric}:mean", f"{metric}:ci95_lo", f"{metric}:ci95_hi"
    has = mean in df and df[mean].notna().any()
    r_key, a_key, t_key = LORA_KEYS
    others = [c for c in cols if c != r_key]

    if has and r_key in df:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, sub in df.groupby(others, dropna=False, sort=False) if others else [("", df)]:
            sub = sub.sort_values(r_key)
            err = [
                (sub[mean] - sub[lo]).fillna(0).clip(lower=0).tolist(),
                (sub[hi] - sub[mean]).fillna(0).clip(lower=0).tolist(),
            ]
            name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, _tuple(label)))
            ax.errorbar(sub[r_key], sub[mean], yerr=err, marker="o", capsize=3, label=name or None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs rank (mean, 95% CI over seeds)")
        if others:
            ax.legend(fontsize=7)
        _save(fig, out / "loss_vs_rank.png", written, f"held-out {metric} vs LoRA rank, one line per target set")

    if has and r_key in df and a_key in df:
        targets = list(dict.fromkeys(df[t_key])) if t_key in df else [None]
        fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 4), squeeze=False)
        for ax, target in zip(axes[0], targets):
            sub = df if target is None else df[df[t_key] == target]
            grid = sub.pivot_table(index=r_key, columns=a_key, values=mean, aggfunc="mean")
            im = ax.imshow(grid.values, cmap="viridis_r" if M.GOALS.get(metric) == "min" else "viridis")
            ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
            ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
            ax.set_xlabel("alpha")
            ax.set_ylabel("rank r")
            ax.set_title(f"{target}" if target is not None else metric)
            for (i, j), v in _cells(grid.values):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8, label=metric)
        _save(fig, out / "rank_alpha_heatmap.png", written, f"{metric} (mean over seeds) for each rank x alpha")

    curves = {}
    for r in runs:
        if r.ok:
            rows = [x for x in _curves(r) if M.TRAIN_LOSS in x and x.get("step") is not None]
            if rows:
                curves.setdefault(_key(r.config, cols), []).append(rows)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for _, row in df.iterrows():
            members = curves.get(_key({c: row[c] for c in cols}, cols))
            if not members:
                continue
            by_step: dict[float, list[float]] = {}
            for rows in members:
                for x in rows:
                    by_step.setdefault(x["step"], []).append(x[M.TRAIN_LOSS])
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=_config_label(row, cols))
        ax.set_xlabel("step")
        ax.set_ylabel(M.TRAIN_LOSS)
        ax.set_title(f"{M.TRAIN_LOSS} per configuration (mean over seeds)")
        ax.legend(fontsize=6, ncol=2)
        _save(fig, out / "loss_curves.png", written, "training loss per configuration, mean over seeds")

    p_mean = f"{M.TRAINABLE_PARAMS}:mean"
    if has and p_mean in df:
        fig, ax = plt.subplots(figsize=(6, 4))
        groups = df.groupby(t_key, sort=False) if t_key in df else [(None, df)]
        for target, sub in groups:
            ax.scatter(sub[p_mean], sub[mean], label=str(target) if target is not None else None)
            if r_key in sub:
                for _, row in sub.iterrows():
                    ax.annotate(f"r={row[r_key]}", (row[p_mean], row[mean]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs trainable parameters")
        if t_key in df:
            ax.legend(fontsize=7)
        _save(fig, out / "metric_vs_params.png", written, f"{metric} vs trainable parameters, by target set")
    return written


def _tuple(label) -> tuple:
    return label if isinstance(label, tuple) else (label,)


def _cells(values):
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                yield (i, j), v


def _save(fig, path: Path, written: dict[str, str], caption: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    written[path.name] = caption


# ---------------------------------------------------------------------------------------------
# documents


def _failed_rows(runs: list[RunResult], cols: list[str]) -> list[list[str]]:
    return [
        [str(r.path), r.status, _config_label(r.config, cols), str(r.seed), " ".join((r.error or "").split())[:300]]
        for r in runs
        if not r.ok
    ]


def write_markdown(out: Path, sweep_dirs, df, runs, cols, metric: str, plots: dict[str, str], extra: list[str]) -> str:
    header, rows = _summary_rows(df, cols)
    ok = sum(r.ok for r in runs)
    lines = [
        "# LoRA sweep report",
        "",
        f"Sweep directories: {', '.join(f'`{d}`' for d in sweep_dirs)}  ",
        f"{len(runs)} runs: {ok} completed, {len(runs) - ok} not completed; {len(df)} configurations.  ",
        "Cells: mean ± sample std [95% t-interval] over seeds; **bold** = best in its column. "
        "Every row's run directories are in `results.csv` (`run_dirs`), every run in `runs.csv`.",
        "",
        _md_table(header, rows),
        "",
    ]
    best = _best_index(df, metric)
    if best is not None:
        lines += [f"Best configuration by {metric}: {_config_label(df.loc[best], cols)}", ""]
    failed = _failed_rows(runs, cols)
    lines += ["## Failed runs", ""]
    lines += (
        [_md_table(["run_dir", "status", "configuration", "seed", "error"], failed), ""] if failed else ["None.", ""]
    )
    for name, caption in plots.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    lines += extra
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def write_html(out: Path, sweep_dirs, df, runs, cols, metric: str, plots: dict[str, str], extra: list[str]) -> None:
    header, rows = _summary_rows(df, cols)

    def table(head, body) -> str:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join(
            "<tr>"
            + "".join(
                f"<td><b>{html.escape(c[2:-2])}</b></td>"
                if c.startswith("**") and c.endswith("**")
                else f"<td>{html.escape(c)}</td>"
                for c in r
            )
            + "</tr>"
            for r in body
        )
        return f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>"

    ok = sum(r.ok for r in runs)
    failed = _failed_rows(runs, cols)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>LoRA sweep report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}img{max-width:100%}",
        "</style></head><body><h1>LoRA sweep report</h1>",
        f"<p>Sweep directories: {html.escape(', '.join(map(str, sweep_dirs)))}<br>",
        f"{len(runs)} runs: {ok} completed, {len(runs) - ok} not completed; {len(df)} configurations.<br>",
        "Cells: mean ± sample std [95% t-interval] over seeds; <b>bold</b> = best in its column. "
        "Run directories per row: results.csv (run_dirs); every run: runs.csv.</p>",
        table(header, rows),
    ]
    best = _best_index(df, metric)
    if best is not None:
        parts.append(
            f"<p>Best configuration by {html.escape(metric)}: {html.escape(_config_label(df.loc[best], cols))}</p>"
        )
    parts.append("<h2>Failed runs</h2>")
    parts.append(table(["run_dir", "status", "configuration", "seed", "error"], failed) if failed else "<p>None.</p>")
    for name, caption in plots.items():
        data = base64.b64encode((out / name).read_bytes()).decode()
        parts.append(
            f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
        )
    parts += [f"<p>{html.escape(line)}</p>" for line in extra if line]
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------
# W&B (online only)


def wandb_groups(runs: list[RunResult]) -> list[tuple[str, str]]:
    """``(project, group)`` of the runs that logged to W&B online."""
    seen = {}
    for r in runs:
        if r.metrics.get(M.WANDB_MODE) == "online" and r.metrics.get(M.WANDB_GROUP):
            seen[(r.metrics.get(M.WANDB_PROJECT), r.metrics[M.WANDB_GROUP])] = None
    return list(seen)


def wandb_online_extras(runs: list[RunResult], entity: str | None, metric: str) -> list[str]:
    """W&B runs of the sweep's groups missing locally, and a W&B Report per group; notes for the report.

    Only when logged in and the runs were logged online; any failure is a note, never an error.
    """
    from lora_exp.training.loggers import wandb_logged_in

    groups = wandb_groups(runs)
    if not groups or not wandb_logged_in():
        return []
    notes = []
    local = {r.metrics.get(M.WANDB_RUN_ID) for r in runs}
    try:
        import wandb

        api = wandb.Api()
        entity = entity or api.default_entity
        for project, group in groups:
            remote = list(api.runs(f"{entity}/{project}", filters={"group": group}))
            missing = [f"{r.id} ({r.state})" for r in remote if r.id not in local]
            notes.append(
                f"W&B group {entity}/{project}/{group}: {len(remote)} runs"
                + (f"; not on this machine: {', '.join(missing)}" if missing else "")
            )
            notes.append(create_wandb_report(entity, project, group, metric))
    except Exception as e:
        notes.append(f"W&B: skipped ({type(e).__name__}: {e})")
    return notes


def create_wandb_report(entity: str, project: str, group: str, metric: str) -> str:
    """A W&B Report of one sweep group: metric vs rank, loss curves, a runs table."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return "W&B Report: skipped (pip install wandb-workspaces, or lora-exp[sweeps])"
    runset = wr.Runset(entity=entity, project=project, name=group, filters=f"Metric('Group') == '{group}'")
    report = wr.Report(
        entity=entity,
        project=project,
        title=f"LoRA sweep {group}",
        description="Generated by python -m lora_exp.report",
        blocks=[
            wr.H1(f"Sweep {group}"),
            wr.PanelGrid(
                runsets=[runset],
                panels=[
                    wr.ScatterPlot(x="lora.r", y=metric),
                    wr.LinePlot(x="Step", y=[M.TRAIN_LOSS]),
                    wr.LinePlot(x="Step", y=[M.VAL_LOSS]),
                    wr.ParallelCoordinatesPlot(
                        columns=[
                            wr.ParallelCoordinatesPlotColumn(metric="c::lora.r"),
                            wr.ParallelCoordinatesPlotColumn(metric="c::lora.alpha"),
                            wr.ParallelCoordinatesPlotColumn(metric=metric),
                        ]
                    ),
                ],
            ),
        ],
    )
    report.save()
    return f"W&B Report: {report.url}"


# ---------------------------------------------------------------------------------------------
# entry point


def build_report(
    sweep_dirs: list[Path], out: Path | None = None, metric: str = M.VAL_LOSS, online: bool = True, entity=None
) -> Path:
    """Build the report of ``sweep_dirs`` into ``out`` (default ``<first sweep dir>/report``); return ``out``."""
    if metric not in M.REPORT_METRICS:
        raise ReportError(f"--metric {metric}: not a report metric; expected one of {', '.join(M.REPORT_METRICS)}")
    sweep_dirs = [Path(d).expanduser().resolve() for d in sweep_dirs]
    runs = load_runs(sweep_dirs)
    out = Path(out).expanduser().resolve() if out else sweep_dirs[0] / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    df = results_table(runs)
    cols = config_columns(runs)
    df.to_csv(out / "results.csv", index=False)
    runs_table(runs).to_csv(out / "runs.csv", index=False)
    (out / "results.tex").write_text(to_latex(df, cols))
    plots = make_plots(df, runs, cols, metric, out)
    extra = wandb_online_extras(runs, entity, metric) if online else []
    write_markdown(out, sweep_dirs, df, runs, cols, metric, plots, extra)
    write_html(out, sweep_dirs, df, runs, cols, metric, plots, extra)
    ok = sum(r.ok for r in runs)
    print(
        f"[lora-exp] report: {len(runs)} runs ({ok} completed, {len(runs) - ok} not), {len(df)} configurations "
        f"-> {out}/report.html, report.md, results.csv, results.tex, {len(plots)} plots",
        flush=True,
    )
    return out
