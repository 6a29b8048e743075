"""The report's PNG plots: metric vs rank, rank x alpha heatmap, loss curves, metric vs parameters / FLOPs.

Rows without a rank (full fine-tuning) are left out of the rank plots and shown in the
parameter/FLOPs plots under their method; the base model (no training) is a dashed line.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from lora_exp import metrics as M
from lora_exp.reporting import forgetting
from lora_exp.reporting.baselines import METHOD, method_label
from lora_exp.reporting.collect import LORA_KEYS, PER_RUN, RunResult, config_label, group_runs, plain_value

TRAIN_FLOPS = M.COMPUTE_TRAIN_FLOPS  # per-run training FLOPs (metrics.json), when runs record compute


def make_plots(df, runs: list[RunResult], cols: list[str], metric: str, out: Path, bases=None) -> dict[str, str]:
    """Write the PNG plots that the data supports; return ``{file name: caption}`` of those written.

    ``bases`` (``baselines.base_table``) draws the base model's value as a reference line.
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", module="matplotlib")  # one-point axes etc.: the plot is still right
    written: dict[str, str] = {}
    df = df[df["n"] > 0]  # configurations whose runs all failed are listed, not plotted
    has = f"{metric}:mean" in df and df[f"{metric}:mean"].notna().any()
    r_key, a_key, _ = LORA_KEYS
    base = _base_values(bases, metric)
    ranked = df[df[r_key].notna()] if r_key in df else df.iloc[:0]
    if has and len(ranked):
        _metric_vs_rank(ranked, [c for c in cols if c != METHOD], metric, out, written, base)
    if has and len(ranked) and a_key in df:
        _heatmap(ranked, metric, out, written)
    _loss_curves(df, runs, cols, out, written)
    if has and f"{M.TRAINABLE_PARAMS}:mean" in df:
        path = out / "metric_vs_params.png"
        _metric_vs(df, f"{M.TRAINABLE_PARAMS}:mean", "trainable parameters", metric, path, base=base)
        written["metric_vs_params.png"] = f"{metric} vs trainable parameters, by target set"
    if has and f"{TRAIN_FLOPS}:{PER_RUN}" in df and df[f"{TRAIN_FLOPS}:{PER_RUN}"].notna().any():
        path = out / "metric_vs_flops.png"
        _metric_vs(df, f"{TRAIN_FLOPS}:{PER_RUN}", "training FLOPs per run", metric, path, "FLOP", base)
        written["metric_vs_flops.png"] = f"{metric} vs training FLOPs per run, by target set"
    written.update(forgetting.plot(runs, cols, metric, out))  # only where runs recorded a probe's val/<name>/ppl
    return written


def _base_values(bases, metric: str) -> list[tuple[str, float]]:
    """``(label, mean)`` of each base row that measured ``metric``."""
    if bases is None or not len(bases) or f"{metric}:mean" not in bases:
        return []
    return [
        (row["label"], row[f"{metric}:mean"]) for _, row in bases.iterrows() if not math.isnan(row[f"{metric}:mean"])
    ]


def _base_lines(ax, base: list[tuple[str, float]]) -> None:
    for (label, value), style in zip(base, ("--", ":", "-.", (0, (5, 5)))):
        ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=label)


def _errors(sub, metric: str) -> list[list[float]]:
    """Asymmetric error bars from the 95% t-interval (none where a row has one seed)."""
    mean, lo, hi = (sub[f"{metric}:{s}"] for s in ("mean", "ci95_lo", "ci95_hi"))
    return [(mean - lo).fillna(0).clip(lower=0).tolist(), (hi - mean).fillna(0).clip(lower=0).tolist()]


def _metric_vs_rank(df, cols: list[str], metric: str, out: Path, written: dict[str, str], base=()) -> None:
    import matplotlib.pyplot as plt

    r_key = LORA_KEYS[0]
    others = [c for c in cols if c != r_key]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, sub in df.groupby(others, dropna=False, sort=False) if others else [("", df)]:
        sub = sub.sort_values(r_key)
        name = ", ".join(f"{k.split('.')[-1]}={plain_value(v)}" for k, v in zip(others, _tuple(label)))
        ax.errorbar(sub[r_key], sub[f"{metric}:mean"], yerr=_errors(sub, metric), marker="o", capsize=3,
                    label=name or None)  # fmt: skip
    _base_lines(ax, base)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs rank (mean, 95% CI over seeds)")
    if others or base:
        ax.legend(fontsize=7)
    _save(fig, out / "loss_vs_rank.png", written, f"held-out {metric} vs LoRA rank, one line per target set")


def text_color(rgba) -> str:
    """Black on light cells, white on dark ones (WCAG relative luminance of the cell's colour)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"


def _heatmap(df, metric: str, out: Path, written: dict[str, str]) -> None:
    import matplotlib.pyplot as plt

    r_key, a_key, t_key = LORA_KEYS
    targets = list(dict.fromkeys(df[t_key])) if t_key in df else [None]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        sub = df if target is None else df[df[t_key] == target]
        grid = sub.pivot_table(index=r_key, columns=a_key, values=f"{metric}:mean", aggfunc="mean")
        # the better end of the scale is always the bright one
        im = ax.imshow(grid.values, cmap="viridis_r" if M.goal(metric) == "min" else "viridis")
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
        ax.set_xlabel("alpha")
        ax.set_ylabel("rank r")
        ax.set_title(f"{target}" if target is not None else metric)
        for (i, j), v in _cells(grid.values):
            color = text_color(im.cmap(im.norm(v)))
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color=color, fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8, label=metric)
    _save(fig, out / "rank_alpha_heatmap.png", written, f"{metric} (mean over seeds) for each rank x alpha")


def _curves(run: RunResult) -> list[dict[str, Any]]:
    """A run's logged metrics over steps: ``history.jsonl``, else the CSV logger's ``metrics.csv``."""
    from lora_exp.runs.rundir import RunDir

    rows = RunDir(run.path).history()
    if rows:
        return rows
    for path in sorted(run.path.glob("csv/**/metrics.csv")):
        with path.open() as f:
            return [{k: float(v) for k, v in row.items() if _is_float(v)} for row in csv.DictReader(f)]
    return []


def _is_float(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _loss_curves(df, runs: list[RunResult], cols: list[str], out: Path, written: dict[str, str]) -> None:
    import matplotlib.pyplot as plt

    # results_table's rows are group_runs' groups in order (index i), whatever pandas made of their values
    curves: dict[int, list] = {}
    for i, group in enumerate(group_runs(runs, cols)):
        for r in group:
            rows = [x for x in _curves(r) if M.TRAIN_LOSS in x and x.get("step") is not None] if r.ok else []
            if rows:
                curves.setdefault(i, []).append(rows)
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in df.iterrows():
        members = curves.get(i)
        if not members:
            continue
        by_step: dict[float, list[float]] = {}
        for rows in members:
            for x in rows:
                by_step.setdefault(x["step"], []).append(x[M.TRAIN_LOSS])
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=config_label(row, cols))
    ax.set_xlabel("step")
    ax.set_ylabel(M.TRAIN_LOSS)
    ax.set_title(f"{M.TRAIN_LOSS} per configuration (mean over seeds)")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, out / "loss_curves.png", written, "training loss per configuration, mean over seeds")


def _metric_vs(df, x_col: str, x_label: str, metric: str, path: Path, unit: str = "", base=()) -> None:
    """``metric`` (mean, 95% CI) against a per-configuration x on a log axis, one colour per target set.

    Rows of another method (full fine-tuning) get a colour of their own, labelled by the method.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter

    r_key, a_key, t_key = LORA_KEYS
    with_alpha = a_key in df and df[a_key].nunique() > 1
    fig, ax = plt.subplots(figsize=(6, 4))
    key = df[t_key].astype(object) if t_key in df else None
    if METHOD in df:  # rows without target modules (full fine-tuning) are labelled by their method
        key = df[METHOD].map(method_label).where(df[METHOD] != "lora", key) if key is not None else None
    groups = df.groupby(key.fillna("-"), sort=False) if key is not None else [(None, df)]
    for target, sub in groups:
        ax.errorbar(sub[x_col], sub[f"{metric}:mean"], yerr=_errors(sub, metric), fmt="o", capsize=3,
                    label=str(target) if target is not None else None)  # fmt: skip
        if r_key in sub:
            for _, row in sub[sub[r_key].notna()].iterrows():
                label = f"r={plain_value(row[r_key])}" + (f", a={plain_value(row[a_key])}" if with_alpha else "")
                ax.annotate(label, (row[x_col], row[f"{metric}:mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
    x = df[x_col].dropna()
    if len(x) and x.min() > 0 and x.max() / x.min() >= 10:  # a log axis only where it spans a decade or more
        ax.set_xscale("log")
        # 1-2-5 ticks over a few decades; beyond three (LoRA beside full fine-tuning) powers of ten only
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if x.max() / x.min() < 1e3 else (1.0,)))
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
        ax.xaxis.set_major_formatter(EngFormatter(unit=unit, places=1))
    else:  # close values (ranks differ little in FLOPs): few ticks, as many digits as they need
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.xaxis.set_major_formatter(EngFormatter(unit=unit))
    _base_lines(ax, base)
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x_label}")
    if t_key in df or base:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tuple(label) -> tuple:
    return label if isinstance(label, tuple) else (label,)


def _cells(values):
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                yield (i, j), v


def _save(fig, path: Path, written: dict[str, str], caption: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written[path.name] = caption
