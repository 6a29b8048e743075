"""Everything a manuscript cites, rebuilt from run directories (``python -m lora_exp.paper``).

``--out DIR`` receives:

- ``tables/results.tex`` (booktabs: mean ± std over seeds, best bold, † / ≈ marks and their
  legend), ``tables/comparisons.tex`` (each configuration against the best: Δ with its bootstrap
  CI, p, Holm p, effect size), ``tables/compute.tex`` (FLOPs and device-hours per configuration,
  when runs record compute), and the same data as ``tables/results.csv`` / ``comparisons.csv``;
- ``figures/*.pdf`` (vector, TrueType fonts as publishers ask) and ``*.png``: the report's plots
  (error bars are 95% t-intervals over seeds) plus ``configurations``: every configuration's
  mean, CI and individual seeds;
- ``numbers.tex``: one ``\\newcommand`` per citable number (see ``numbers``), listed with its
  meaning in ``README.md``;
- ``manifest.json``: sha256 of every input and output, the command, lora-exp version and git
  commit (see ``manifest``); ``--check`` compares it with the files as they are now.

The statistics, tables and plots are the report's (``collect``, ``stats``, ``comparisons``,
``tables``, ``plots``); this module only lays them out for a paper. The folder is written to a
temporary sibling and moved into place, so a failure leaves the previous output or none.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from lora_exp import metrics as M
from lora_exp.reporting import comparisons as C
from lora_exp.reporting import manifest, numbers, tables
from lora_exp.reporting.collect import (
    ReportError,
    config_columns,
    config_label,
    group_runs,
    load_runs,
    report_metrics,
    results_table,
    seed_values,
)
from lora_exp.reporting.stats import ALPHA

PAPER_MARKER = ".lora-exp-paper"  # in every --out this command wrote: only such a folder is ever replaced
TABLES, FIGURES = "tables", "figures"
NUMBERS_FILE, README_FILE = "numbers.tex", "README.md"
FIGURE_FORMATS = ("pdf", "png")


def build_paper(
    sweep_dirs: list[Path],
    out: Path,
    metric: str = M.VAL_LOSS,
    alpha: float = ALPHA,
    baseline: list[str] | None = None,
    overwrite: bool = False,
    command: list[str] | None = None,
) -> Path:
    """Build the paper folder ``out`` from the runs under ``sweep_dirs``; return ``out``.

    Args:
        sweep_dirs: sweep (multirun) directories or run directories.
        out: the output folder; an existing one is replaced only when it is a previous paper output
            and ``overwrite`` is set (``runs.outputs.safe_output_dir``).
        metric: the metric of the figures and of ``\\Best...`` numbers besides every table metric.
        alpha: the family-wise significance level.
        baseline: ``KEY=VALUE`` items naming a configuration every other is also compared with.
        overwrite: replace a previous paper output at ``out``.
        command: the command line recorded in the manifest.
    """
    from lora_exp.runs.outputs import OutputDirError, replace_dir, safe_output_dir

    if metric not in M.REPORT_METRICS:
        raise ReportError(f"--metric {metric}: not a report metric; expected one of {', '.join(M.REPORT_METRICS)}")
    if not 0 < alpha < 1:
        raise ReportError(f"--alpha {alpha}: expected a level between 0 and 1")
    try:
        out = safe_output_dir(out, PAPER_MARKER, overwrite, option="--out")
    except OutputDirError as e:  # the shared message speaks Hydra (overwrite=true); this command is argparse
        raise OutputDirError(str(e).replace("overwrite=true", "--overwrite")) from None
    sweep_dirs = [Path(d).expanduser().resolve() for d in sweep_dirs]
    runs = load_runs(sweep_dirs)
    df, cols = results_table(runs), config_columns(runs)
    baseline_row = C.find_baseline(df, cols, baseline)
    comps = C.compare_runs(runs, cols, report_metrics(runs), baseline_row, alpha)
    command = command or ["python", "-m", "lora_exp.paper"]
    options = {"metric": metric, "alpha": alpha, "baseline": baseline}
    record = manifest.build(sweep_dirs, runs, _labels(runs, cols), command, options)  # hashed before reading more
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / TABLES).mkdir(parents=True)
        written = write_tables(tmp / TABLES, df, cols, comps)
        figures = write_figures(tmp / FIGURES, df, runs, cols, metric, comps)
        cited = numbers.citable_numbers(df, cols, comps, runs, metric)
        (tmp / NUMBERS_FILE).write_text(numbers.numbers_tex(cited, " ".join(command)))
        (tmp / README_FILE).write_text(readme(out, sweep_dirs, command, written, figures, cited, runs, df))
        (tmp / PAPER_MARKER).write_text(
            "written by python -m lora_exp.paper; its presence lets --overwrite replace it\n"
        )
        manifest.write(tmp, record, skip=(PAPER_MARKER,))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ok = sum(r.ok for r in runs)
    print(
        f"[lora-exp] paper: {len(runs)} runs ({ok} completed), {len(df)} configurations -> {out}: "
        f"{len(written)} tables, {len(figures)} figures (pdf+png), {len(cited)} numbers in {NUMBERS_FILE}, "
        f"{manifest.MANIFEST_FILE}",
        flush=True,
    )
    return out


def _labels(runs, cols: list[str]) -> dict[Path, str]:
    return {r.path: config_label(r.config, cols) for r in runs}


def write_tables(folder: Path, df, cols: list[str], comps) -> dict[str, str]:
    """The LaTeX tables (and their CSV data); return ``{file: what it holds}``."""
    from lora_exp.reporting.report import compute_table

    latex = tables.to_latex(df, cols, comps).replace("python -m lora_exp.report", "python -m lora_exp.paper", 1)
    (folder / "results.tex").write_text(latex)
    C.add_columns(df, comps).to_csv(folder / "results.csv", index=False)
    written = {
        f"{TABLES}/results.tex": "configurations, mean ± std over seeds of the main metrics, marks and legend",
        f"{TABLES}/results.csv": "the same rows with every metric's n, mean, std, CI and every comparison field",
    }
    long = C.long_table(df, cols, comps)
    if len(long):
        long.to_csv(folder / "comparisons.csv", index=False)
        shown = tables.comparison_rows(long[long["metric"].isin(tables.table_metrics(df))])
        if len(shown):
            (folder / "comparisons.tex").write_text(_booktabs(shown.drop(columns=["p (Wilcoxon)"]), "l" * 3))
            written[f"{TABLES}/comparisons.tex"] = (
                "each configuration vs the best (and baseline): Δ [95% CI], p, Holm p"
            )
        written[f"{TABLES}/comparisons.csv"] = "every comparison, one row per (metric, reference, configuration)"
    compute = compute_table(df, cols)
    if compute is not None:
        (folder / "compute.tex").write_text(_booktabs(compute, "l" * len(cols)))
        written[f"{TABLES}/compute.tex"] = "training FLOPs and device-hours per configuration (all its runs)"
    return written


def _booktabs(frame, left: str) -> str:
    """A DataFrame of display strings as a booktabs tabular; every cell and header escaped for LaTeX."""
    frame = frame.astype(str)
    styler = frame.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    body = styler.to_latex(hrules=True, column_format=left + "r" * (frame.shape[1] - len(left)))
    # pandas escapes ASCII specials only; the report's display strings also use these
    for glyph, tex in (("∞", r"$\infty$"), ("Δ", r"$\Delta$"), ("≈", r"$\approx$"), ("†", r"$\dagger$")):
        body = body.replace(glyph, tex)
    body = re.sub(r"\b(\d(?:\.\d+)?)e([+-])0*(\d+)\b", _times_ten, body)  # 2.734e+10 as 2.734 x 10^10
    return "% generated by python -m lora_exp.paper (needs \\usepackage{booktabs})\n" + body


def _times_ten(m) -> str:
    exponent = ("-" if m.group(2) == "-" else "") + m.group(3)
    return rf"${m.group(1)}\times10^{{{exponent}}}$"


@contextlib.contextmanager
def _vector_copies(formats: tuple[str, ...]):
    """While active, a figure saved as ``X.png`` is also saved as ``X.<format>`` for each other format.

    The report's plot functions (``plots``, and those it calls) write PNG for the HTML report; this
    gives the paper every one of them, present and future, as vector PDF too without a second
    copy of their code.
    """
    from matplotlib.figure import Figure

    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        original(self, fname, *args, **kwargs)
        path = Path(fname) if isinstance(fname, (str, os.PathLike)) else None
        if path is not None and path.suffix == ".png":
            for fmt in formats:
                if fmt != "png":
                    original(
                        self, path.with_suffix(f".{fmt}"), *args, **{k: v for k, v in kwargs.items() if k != "dpi"}
                    )

    Figure.savefig = savefig
    try:
        yield
    finally:
        Figure.savefig = original


def write_figures(folder: Path, df, runs, cols: list[str], metric: str, comps) -> dict[str, str]:
    """Every figure as PDF and PNG; return ``{stem: caption}``."""
    import matplotlib

    matplotlib.use("Agg")
    from lora_exp.reporting.plots import make_plots

    folder.mkdir(parents=True, exist_ok=True)
    # TrueType (42) rather than Type 3 fonts: journal and conference checkers reject Type 3
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}), _vector_copies(FIGURE_FORMATS):
        written = make_plots(df, runs, cols, metric, folder)
        if f"{metric}:mean" in df and df[f"{metric}:mean"].notna().any():
            _configurations_figure(df, runs, cols, metric, comps, folder / "configurations.png")
            written["configurations.png"] = f"{metric} per configuration: mean, 95% CI over seeds, each seed"
    return {Path(name).stem: caption for name, caption in written.items()}


def _configurations_figure(df, runs, cols: list[str], metric: str, comps, path: Path) -> None:
    """One row per configuration: the seeds as dots, the mean with its 95% t-interval, the marks."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    groups = group_runs(runs, cols)
    marks = {"best": " (best)", "worse": " †", "same": " ≈", "better": " (better)"}
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(df) + 1.5))
    for y, (i, row) in enumerate(df.iterrows()):
        mean, lo, hi = (row[f"{metric}:{s}"] for s in ("mean", "ci95_lo", "ci95_hi"))
        _, values = seed_values(groups[i], metric)
        ax.scatter(values, [y] * len(values), s=14, color="0.55", zorder=2)
        err = [[max(mean - lo, 0)], [max(hi - mean, 0)]] if hi == hi else None  # NaN with one seed: no bar
        best = comps.mark(metric, i) == "best"
        ax.errorbar([mean], [y], xerr=err, fmt="D" if best else "o", color="C3" if best else "C0", capsize=4, zorder=3)
    labels = [config_label(row, cols) + marks.get(comps.mark(metric, i), "") for i, row in df.iterrows()]
    ax.set_yticks(range(len(df)), labels, fontsize=8)
    ax.set_ylim(len(df) - 0.5, -0.5)  # first row on top, half a row of margin
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    goal = M.goal(metric)
    ax.set_xlabel(f"{metric} ({'lower' if goal == 'min' else 'higher'} is better)" if goal else metric)
    ax.set_title(f"{metric} per configuration: mean, 95% CI over seeds", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles = [
        Line2D([], [], ls="", marker="o", ms=4, color="0.55", label="one seed"),
        Line2D([], [], ls="-", marker="o", color="C0", label="mean, 95% CI"),
        Line2D([], [], ls="-", marker="D", color="C3", label="best mean"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def readme(
    out: Path, sweep_dirs, command: list[str], written: dict[str, str], figures: dict[str, str], cited, runs, df
) -> str:
    """``README.md`` of the paper folder: what each file is, how to use it, and every macro's meaning."""
    import shlex

    ok = sum(r.ok for r in runs)
    lines = [
        "# Paper outputs",
        "",
        f"Generated by `{shlex.join(command)}` from {len(runs)} runs ({ok} completed) in {len(df)} configurations "
        f"under {', '.join(f'`{d}`' for d in sweep_dirs)}. Do not edit by hand: rerun the command "
        "(with `--overwrite`).",
        "",
        "Before submitting, check that no run changed since: "
        f"`python -m lora_exp.paper --check --out {shlex.quote(str(out))}` (exit 0: every input and output "
        "matches `manifest.json`; exit 1 names each file that does not).",
        "",
        "In LaTeX: `\\input{numbers.tex}` in the preamble, `\\usepackage{booktabs}`, `\\input{tables/results.tex}`, "
        "`\\includegraphics{figures/configurations.pdf}`.",
        "",
        "## Files",
        "",
        tables.md_table(["file", "content"], [[f"`{k}`", v] for k, v in written.items()]),
        "",
        tables.md_table(["figure (figures/NAME.pdf, .png)", "content"], [[f"`{k}`", v] for k, v in figures.items()]),
        "",
        f"`{NUMBERS_FILE}`: the macros below. `{manifest.MANIFEST_FILE}`: sha256 of every input file of every run "
        "(metrics.json, run.json, .hydra/config.yaml, .hydra/overrides.yaml, history.jsonl; tuning.json) and of "
        "every output, the command, lora-exp version and git commit.",
        "",
        "## Numbers",
        "",
        "Configurations are lettered A, B, ... in the order of `tables/results.tex`.",
        "",
        tables.md_table(["macro", "value", "meaning"], [[f"`\\{n.name}`", f"`{n.value}`", n.meaning] for n in cited]),
    ]
    return "\n".join(lines) + "\n"
