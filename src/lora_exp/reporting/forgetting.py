"""The learning-forgetting plot: gain on the task against perplexity on a forgetting probe.

One point per configuration: x is the perplexity the fine-tuned model scores on a probe set
(``data.eval_sets.<name> = {probe: general_text}``, ``val/<name>/ppl``), y is the gain on the
report's task metric over the base model (``base/val/...`` -> ``val/...``, signed so that up is
better). Both are means over the configuration's seeds with 95% t-intervals as error bars (each
axis on its own); the base model's probe perplexity is a dashed vertical line. Points up and to
the left learned the most while drifting least from the base distribution (see
``lora_exp.data.probe``: the probe measures drift, not knowledge).
"""

from __future__ import annotations

from pathlib import Path

from lora_exp import metrics as M
from lora_exp.reporting.collect import RunResult, aggregate, config_label, group_runs, number

FILE = "learning_vs_forgetting.png"


def probe_names(runs: list[RunResult]) -> list[str]:
    """Names of the probe sets (``{probe: ...}`` in ``data.eval_sets``) whose ppl some completed run recorded."""
    from lora_exp.runs.rundir import RunDir

    names: list[str] = []
    for r in runs:
        if not r.ok:
            continue
        try:
            sets = RunDir(r.path).config().data.get("eval_sets") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for name, spec in sets.items():
            recorded = number(r.metrics.get(M.eval_set(str(name), M.VAL_PPL))) is not None
            if recorded and spec is not None and spec.get("probe") and name not in names:
                names.append(str(name))
    return names


def gain(run: RunResult, metric: str) -> float | None:
    """How much better than the base model a run is on ``metric`` (positive: better), or None."""
    after, before = number(run.metrics.get(metric)), number(run.metrics.get(M.base(metric)))
    if after is None or before is None:
        return None
    return before - after if M.goal(metric) == "min" else after - before


def plot(runs: list[RunResult], cols: list[str], metric: str, out: Path) -> dict[str, str]:
    """Draw the plot into ``out`` when runs recorded a probe; return ``{file name: caption}`` ({} if not drawn)."""
    names = probe_names(runs)
    task = metric if metric in M.VAL_METRICS else M.VAL_LOSS  # a gain needs the base's value of the same metric
    if not names:
        return {}
    probe = names[0]
    ppl_key = M.eval_set(probe, M.VAL_PPL)
    points = []
    for members in group_runs([r for r in runs if r.ok], cols):
        pairs = [(gain(r, task), number(r.metrics.get(ppl_key))) for r in members]
        pairs = [(g, p) for g, p in pairs if g is not None and p is not None]
        if pairs:
            label = config_label({c: members[0].config.get(c) for c in cols}, cols) or members[0].path.name
            points.append((label, aggregate([p for _, p in pairs]), aggregate([g for g, _ in pairs])))
    if not points:
        return {}
    base_ppl = [v for r in runs if r.ok and (v := number(r.metrics.get(M.base(ppl_key)))) is not None]
    _draw(points, base_ppl, task, probe, out / FILE)
    return {
        FILE: f"gain in {task} over the base model vs perplexity on the {probe} probe (drift from the base "
        "model's own text; dashed: the base), one point per configuration, mean and 95% CI over seeds"
    }


def _draw(points: list, base_ppl: list[float], task: str, probe: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, x, y in points:
        ax.errorbar(x["mean"], y["mean"], xerr=_half(x), yerr=_half(y), fmt="o", capsize=3)
        ax.annotate(label, (x["mean"], y["mean"]), fontsize=6, xytext=(4, 4), textcoords="offset points")
    if base_ppl:
        ax.axvline(sum(base_ppl) / len(base_ppl), color="grey", linestyle="--", linewidth=1, label="base model")
        ax.legend(fontsize=7)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel(f"{M.eval_set(probe, M.VAL_PPL)} (higher: further from the base)")
    ax.set_ylabel(f"gain in {task} over the base")
    ax.set_title("learning vs forgetting (mean, 95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _half(stats: dict[str, float]) -> list[list[float]] | None:
    """Asymmetric error bar of one point from its 95% interval; None with a single seed."""
    lo, hi, mean = stats["ci95_lo"], stats["ci95_hi"], stats["mean"]
    if lo != lo or hi != hi:  # NaN: one seed, no interval
        return None
    return [[max(mean - lo, 0.0)], [max(hi - mean, 0.0)]]
