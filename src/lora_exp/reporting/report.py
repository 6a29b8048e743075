"""The comparison report over a sweep's run directories (``python -m lora_exp.report``).

Writes ``<first SWEEP_DIR>/report/`` (or ``--out``):

- ``results.csv``: one row per configuration, seeds aggregated: for every metric its number of
  runs, mean, sample std and 95% t-interval (``<metric>:<stat>``); for every metric with a
  direction its comparison with the best row (``<metric>:vs_best:<field>``: test, difference and
  its bootstrap CI, p, Holm-corrected p, Wilcoxon p, effect size, seeds for 80% power, mark) and,
  with ``--baseline``, with the baseline (``:vs_baseline:``); compute totals when runs record
  them; the run directories of each row;
- ``comparisons.csv``: the same comparisons, one row per (metric, reference, configuration), and
  each configuration's difference from the base model (reference ``base``);
- ``runs.csv``: one row per run directory (failed ones too) with its status and raw metrics;
- ``baselines.csv``: the base model (no training) as reference rows, one per distinct base model
  and evaluation data, from the ``base/`` measurement every run makes (see ``baselines``);
  ``results.csv`` has each configuration's per-run difference from it (``<metric>:vs_base:*``);
- in a tuned sweep (``tuning.json``, ``hydra/sweeper=tuned``): only the replicates at each
  configuration's chosen rate are rows, ``results.csv`` has ``tuned lr`` and ``lr candidates``,
  and the documents state the protocol and list the candidates' scores (see ``tuning``);
- ``results.tex`` (booktabs, mean ± std, best bold, † significantly worse than the best, ≈ not
  distinguishable from it, a legend), ``report.md`` and a self-contained ``report.html``;
- PNG plots (see ``plots``), and a W&B summary run of the group's tables (see ``wandb_report``).

Everything comes from local files, so the report works offline and every number traces back to
a run directory.

The modules: ``collect`` (run directories -> rows), ``stats`` (tests), ``comparisons`` (tests ->
columns), ``tables`` (LaTeX/Markdown/HTML), ``plots``, ``wandb_report``; this one puts them together.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from lora_exp import metrics as M
from lora_exp.reporting import baselines as B
from lora_exp.reporting import comparisons as C
from lora_exp.reporting import tables, tuning
from lora_exp.reporting.collect import (  # noqa: F401  (the report's public names, importable from here)
    COMPUTE_TOTALS,
    REPORT_DIR,
    STATS,
    TOTAL,
    ReportError,
    RunResult,
    aggregate,
    config_columns,
    config_label,
    group_runs,
    load_runs,
    report_metrics,
    results_table,
    runs_table,
    stat_columns,
)
from lora_exp.reporting.plots import make_plots
from lora_exp.reporting.stats import ALPHA
from lora_exp.reporting.tables import TABLE_METRICS  # noqa: F401
from lora_exp.reporting.wandb_report import log_summary_run, wandb_online_extras

DEVICE_HOURS = M.COMPUTE_DEVICE_HOURS


def build_report(
    sweep_dirs: list[Path],
    out: Path | None = None,
    metric: str = M.VAL_LOSS,
    online: bool = True,
    entity: str | None = None,
    baseline: list[str] | None = None,
    alpha: float = ALPHA,
) -> Path:
    """Build the report of ``sweep_dirs`` into ``out`` (default ``<first sweep dir>/report``); return ``out``.

    Args:
        sweep_dirs: sweep (multirun) directories or run directories.
        out: the output folder.
        metric: the metric of the plots and of "best configuration".
        online: contact W&B when logged in (the summary run is offline otherwise).
        entity: W&B entity of the online report.
        baseline: ``KEY=VALUE`` items naming one configuration to compare every other with.
        alpha: the family-wise significance level of the marks.
    """
    import pandas as pd

    if metric not in M.REPORT_METRICS:
        raise ReportError(f"--metric {metric}: not a report metric; expected one of {', '.join(M.REPORT_METRICS)}")
    if not 0 < alpha < 1:
        raise ReportError(f"--alpha {alpha}: expected a level between 0 and 1")
    sweep_dirs = [Path(d).expanduser().resolve() for d in sweep_dirs]
    runs = load_runs(sweep_dirs)
    df = results_table(runs)
    cols = config_columns(runs)
    baseline_row = C.find_baseline(df, cols, baseline)  # before anything is written: a bad name leaves nothing
    comps = C.compare_runs(runs, cols, report_metrics(runs), baseline_row, alpha)
    long = C.long_table(df, cols, comps)
    bases, vs = B.base_table(runs, cols), B.vs_base(runs, cols)
    out = Path(out).expanduser().resolve() if out else sweep_dirs[0] / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    results = C.add_columns(df, comps)
    results = results.join(vs) if len(vs.columns) else results
    results.to_csv(out / "results.csv", index=False)
    frames = [f for f in (long, B.vs_base_long(df, vs, cols, config_label)) if len(f)]
    (pd.concat(frames, ignore_index=True) if frames else long).to_csv(out / "comparisons.csv", index=False)
    runs_table(runs).to_csv(out / "runs.csv", index=False)
    if len(bases):
        bases.to_csv(out / "baselines.csv", index=False)
    protocols = tuning.protocol_lines(runs)
    notes = tuple(tuning.protocol_lines(runs, with_files=False))  # a paper's footnote: no local paths
    (out / "results.tex").write_text(tables.to_latex(df, cols, comps, bases, notes))
    plots = make_plots(df, runs, cols, metric, out, bases=bases)
    shown = tables.comparison_rows(long[long["metric"].isin(tables.table_metrics(df))]) if len(long) else long
    extra = wandb_online_extras(runs, entity, metric) if online else []
    display, _ = tables.display(df, cols, comps, "md", bases)
    extra += log_summary_run(runs, {"results": display, "comparison": shown}, out, online)
    doc = _Document(sweep_dirs, df, runs, cols, metric, comps, shown, plots, extra)
    doc.bases, doc.vs, doc.protocols = bases, vs, protocols
    (out / "report.md").write_text(doc.markdown(out))
    (out / "report.html").write_text(doc.html(out))
    ok = sum(r.ok for r in runs)
    print(
        f"[lora-exp] report: {len(runs)} runs ({ok} completed, {len(runs) - ok} not), {len(df)} configurations "
        f"-> {out}/report.html, report.md, results.csv, comparisons.csv, results.tex, {len(plots)} plots"
        + (f"; {len(bases)} base model row(s) in baselines.csv" if len(bases) else ""),
        flush=True,
    )
    return out


def compute_lines(df) -> list[str]:
    """The sweep's total compute, when the runs record it (nothing for runs without ``compute/*`` keys)."""
    parts = []
    if f"{COMPUTE_TOTALS[0]}:{TOTAL}" in df:
        parts.append(f"{df[f'{COMPUTE_TOTALS[0]}:{TOTAL}'].sum():.3e} training FLOPs")
    if f"{DEVICE_HOURS}:{TOTAL}" in df:
        parts.append(f"{df[f'{DEVICE_HOURS}:{TOTAL}'].sum():.3f} device-hours")
    return [f"Sweep compute (all runs, failed ones included): {', '.join(parts)}."] if parts else []


def compute_table(df, cols: list[str]):
    """Per-configuration compute totals (FLOPs, device-hours) as display strings; None without them."""
    keys = [k for k in COMPUTE_TOTALS if f"{k}:{TOTAL}" in df]
    if not keys:
        return None
    view = df[cols].astype(str).copy()
    for k in keys:
        view[f"{k} (total)"] = [f"{v:.3e}" if k.endswith("flops") else f"{v:.3f}" for v in df[f"{k}:{TOTAL}"]]
    return view


class _Document:
    """The human-readable report: the results table with its marks, comparisons, failures, compute, plots."""

    def __init__(self, sweep_dirs, df, runs, cols, metric, comps, shown, plots, extra):
        self.sweep_dirs, self.df, self.runs, self.cols, self.metric = sweep_dirs, df, runs, cols, metric
        self.comps, self.shown, self.plots, self.extra = comps, shown, plots, extra
        self.bases, self.vs, self.protocols = None, None, []

    def intro(self) -> list[str]:
        ok = sum(r.ok for r in self.runs)
        lines = [
            *self.protocols,  # how the rows were produced comes before what they say
            f"{len(self.runs)} runs: {ok} completed, {len(self.runs) - ok} not completed; "
            f"{len(self.df)} configurations.",
            "Cells: mean ± sample std [95% t-interval] over seeds; " + tables.legend(self.comps, self.bases) + ".",
            "Every row's run directories are in results.csv (run_dirs), every run in runs.csv, "
            "every comparison in comparisons.csv.",
        ]
        best = self.comps.get(self.metric)
        if best is not None and (best["mark"] == "best").any():
            i = best.index[best["mark"] == "best"][0]
            lines.append(f"Best configuration by {self.metric}: {config_label(self.df.loc[i], self.cols)}.")
        if self.comps.baseline_row is not None:
            lines.append(f"Baseline: {config_label(self.df.loc[self.comps.baseline_row], self.cols)}.")
        return lines + compute_lines(self.df)

    def side_tables(self) -> list[tuple[str, str, tuple[list[str], list[list[str]], list[list[bool]]]]]:
        """``(title, note, (header, cells, bold))`` of the tables beside the results: tuning, base."""
        out = []
        entries = tuning.row_entries(group_runs(self.runs, self.cols), self.cols, config_label)
        if entries:
            note = "Each configuration's candidate rates, scored by the search runs; bold: the chosen rate."
            out.append(("Learning-rate tuning", note, tuning.candidate_table(entries, tables.fmt)))
        if self.bases is not None and len(self.bases) and self.vs is not None and len(self.vs.columns):
            header, rows = B.vs_base_rows(
                self.df, self.vs, self.cols, tables.table_metrics(self.df), tables.fmt, config_label
            )
            note = (
                "Δ = trained − base, per run (each run against its own base measurement), "
                "mean [95% t-interval]; p of the one-sample t-test in results.csv (<metric>:vs_base:p)."
            )
            out.append(("Against the base model", note, (header, rows, [[False] * len(header)] * len(rows))))
        return out

    def failed(self) -> list[list[str]]:
        return [
            [
                str(r.path),
                r.status,
                config_label(r.config, self.cols),
                str(r.seed),
                " ".join((r.error or "").split())[:300],
            ]
            for r in self.runs
            if not r.ok
        ]

    def markdown(self, out: Path) -> str:
        lines = ["# LoRA sweep report", "", f"Sweep directories: {', '.join(f'`{d}`' for d in self.sweep_dirs)}", ""]
        lines += [f"{line}  " for line in self.intro()]
        lines += ["", tables.to_markdown(self.df, self.cols, self.comps, self.bases), ""]
        for title, note, (header, rows, bold) in self.side_tables():
            rows = [[f"**{v}**" if b else v for v, b in zip(r, br)] for r, br in zip(rows, bold)]
            lines += [f"## {title}", "", note, "", tables.md_table(header, rows), ""]
        if len(self.shown):
            lines += ["## Comparisons", "", tables.md_table(list(self.shown.columns), self.shown.values.tolist()), ""]
        compute = compute_table(self.df, self.cols)
        if compute is not None:
            lines += ["## Compute", "", tables.md_table(list(compute.columns), compute.values.tolist()), ""]
        failed = self.failed()
        lines += ["## Failed runs", ""]
        header = ["run_dir", "status", "configuration", "seed", "error"]
        lines += [tables.md_table(header, failed), ""] if failed else ["None.", ""]
        for name, caption in self.plots.items():
            lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
        return "\n".join(lines + self.extra)

    def html(self, out: Path) -> str:
        import pandas as pd

        esc = html.escape
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>LoRA sweep report</title><style>",
            "body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}img{max-width:100%}",
            "</style></head><body><h1>LoRA sweep report</h1>",
            f"<p>Sweep directories: {esc(', '.join(map(str, self.sweep_dirs)))}<br>",
            "<br>".join(esc(line) for line in self.intro()) + "</p>",
            tables.to_html(self.df, self.cols, self.comps, self.bases),
        ]
        for title, note, (header, rows, bold) in self.side_tables():
            frame = pd.DataFrame(rows, columns=header)
            mask = pd.DataFrame(bold, columns=header).replace({True: "font-weight: bold", False: ""})
            styled = frame.style.hide(axis="index").format(escape="html").format_index(escape="html", axis=1)
            parts += [
                f"<h2>{esc(title)}</h2><p>{esc(note)}</p>",
                styled.apply(lambda _, m=mask: m, axis=None).to_html(),
            ]
        if len(self.shown):
            parts += ["<h2>Comparisons</h2>", self.shown.to_html(index=False, escape=True)]
        compute = compute_table(self.df, self.cols)
        if compute is not None:
            parts += ["<h2>Compute</h2>", compute.to_html(index=False, escape=True)]
        failed = self.failed()
        parts.append("<h2>Failed runs</h2>")
        header = ["run_dir", "status", "configuration", "seed", "error"]
        parts.append(pd.DataFrame(failed, columns=header).to_html(index=False) if failed else "<p>None.</p>")
        for name, caption in self.plots.items():
            data = base64.b64encode((out / name).read_bytes()).decode()
            parts.append(f"<h2>{esc(caption)}</h2><img alt='{esc(name)}' src='data:image/png;base64,{data}'>")
        parts += [f"<p>{esc(line)}</p>" for line in self.extra if line]
        parts.append("</body></html>")
        return "\n".join(parts)
