"""The results table as LaTeX, Markdown and HTML, with the significance marks, through pandas.

Cells are built once per format (mean ± std, the 95% interval in Markdown/HTML, a † or ≈ mark);
pandas' ``Styler`` then escapes every configuration value and header for LaTeX or HTML and bolds
the best cells (``textbf:--rwrap`` / ``font-weight``), so ``$ { } ~ ^ _ % & #`` in a value cannot
break a paper's build. The base model's rows (``baselines``) come first, labelled in the
``method`` column and never marked; a tuned sweep adds the ``tuned lr`` column.
"""

from __future__ import annotations

import math

from lora_exp import metrics as M
from lora_exp.reporting import stats
from lora_exp.reporting.baselines import BASE_LABEL, METHOD, method_label
from lora_exp.reporting.comparisons import VS_BASELINE, Comparisons
from lora_exp.reporting.tuning import TUNED_LR

# the metrics of the LaTeX / Markdown tables (the CSV has every metric in M.REPORT_METRICS)
TABLE_METRICS = (M.VAL_LOSS, M.VAL_PPL, M.VAL_EXACT_MATCH, M.VAL_TOKEN_ACC, M.TRAINABLE_PARAMS)
# how each format writes the pieces of a cell
_GLYPHS = {
    "latex": {"pm": r" $\pm$ ", stats.WORSE: r"$^{\dagger}$", stats.SAME: r"$^{\approx}$", "thousands": "{,}"},
    "md": {"pm": " ± ", stats.WORSE: " †", stats.SAME: " ≈", "thousands": ","},
    "html": {"pm": " ± ", stats.WORSE: " †", stats.SAME: " ≈", "thousands": ","},
}


def fmt(value, metric: str) -> str:
    """A number as the tables show it: counts with thousands separators, ppl with 2 decimals, else 4."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "∞"
    if metric in (M.TRAINABLE_PARAMS, M.TOTAL_PARAMS, M.STEPS) or metric.endswith("tokens"):
        return f"{value:,.0f}"
    if metric.endswith("ppl") or metric.endswith("tokens_per_s"):
        return f"{value:.2f}"
    if metric.endswith("flops"):
        return f"{value:.3g}"
    return f"{value:.4f}"


def table_metrics(df) -> list[str]:
    return [m for m in TABLE_METRICS if f"{m}:mean" in df]


def _cell(row, metric: str, kind: str, with_ci: bool) -> str:
    g = _GLYPHS[kind]
    mean, std = row[f"{metric}:mean"], row[f"{metric}:std"]
    if math.isnan(mean):
        return "--" if kind == "latex" else "-"
    text = fmt(mean, metric)
    if not math.isnan(std):
        text += g["pm"] + fmt(std, metric)
        if with_ci:
            text += f" [{fmt(row[f'{metric}:ci95_lo'], metric)}, {fmt(row[f'{metric}:ci95_hi'], metric)}]"
    return text.replace(",", g["thousands"])


def text_columns(df, cols: list[str], bases=None) -> list[tuple[str, str]]:
    """``(column, header)`` of the table's text columns: method (when it varies or a base row is
    shown), the configuration, the tuned rate."""
    heads = [(METHOD, "method")] if METHOD in cols or _has(bases) else []
    heads += [(c, c.split(".")[-1]) for c in cols if c != METHOD]
    return heads + ([(TUNED_LR, TUNED_LR)] if TUNED_LR in df else [])


def _has(frame) -> bool:
    return frame is not None and len(frame) > 0


def _text(value, column: str) -> str:
    """A configuration value as a cell: ``-`` where it does not apply (a full fine-tune's rank)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == METHOD:
        return method_label(value)
    if isinstance(value, float):
        return f"{value:g}" if column == TUNED_LR or not value.is_integer() else str(int(value))
    return str(value)


def display(df, cols: list[str], comparisons: Comparisons, kind: str, bases=None):
    """The table's cells as strings for ``kind`` (latex, md, html) and a same-shaped mask of best cells.

    ``bases`` (``baselines.base_table``) rows come first: labelled, unmarked, never bold.
    """
    import pandas as pd

    metrics = table_metrics(df)
    text = text_columns(df, cols, bases)
    cells = {head: [_text(v, c) for v in df[c]] if c in df else ["-"] * len(df) for c, head in text}
    cells["n"] = [str(int(v)) for v in df["n"]]
    cells["failed"] = [str(int(v)) for v in df["n_failed"]]
    bold = {head: [False] * len(df) for head in cells}
    for m in metrics:
        marks = [comparisons.mark(m, i) for i in df.index]
        texts = []
        for i, row in df.iterrows():
            texts.append(_cell(row, m, kind, with_ci=kind != "latex") + _GLYPHS[kind].get(marks[i], ""))
        cells[m], bold[m] = texts, [mk == stats.BEST for mk in marks]
    frame, mask = pd.DataFrame(cells), pd.DataFrame(bold)
    if _has(bases):
        top = _base_cells(bases, text, metrics, kind)
        frame = pd.concat([top, frame], ignore_index=True)
        mask = pd.concat([pd.DataFrame(False, index=top.index, columns=mask.columns), mask], ignore_index=True)
    if kind == "latex":
        frame, mask = frame.drop(columns="failed"), mask.drop(columns="failed")
    return frame, mask


def _base_cells(bases, text: list[tuple[str, str]], metrics: list[str], kind: str):
    """The base rows' cells: the label in ``method``, the model/data columns they share, the metrics."""
    import pandas as pd

    rows = []
    for _, row in bases.iterrows():
        line = {head: row["label"] if c == METHOD else _text(row.get(c), c) for c, head in text}
        line["n"], line["failed"] = str(int(row["n"])), "-"
        for m in metrics:
            has = f"{m}:mean" in row and not math.isnan(row[f"{m}:mean"])
            line[m] = _cell(row, m, kind, with_ci=kind != "latex") if has else ("--" if kind == "latex" else "-")
        rows.append(line)
    return pd.DataFrame(rows)


def to_latex(df, cols: list[str], comparisons: Comparisons, bases=None, notes: tuple[str, ...] = ()) -> str:
    """A booktabs table: configuration, n, mean ± std of the main metrics; marks and a legend below it.

    Base rows sit above a rule of their own; ``notes`` (the tuning protocol) follow the legend.
    """
    cells, bold = display(df, cols, comparisons, "latex", bases)
    names = [head for _, head in text_columns(df, cols, bases)]
    styler = (
        cells.style.hide(axis="index")
        .format(escape="latex", subset=names)
        .format_index(escape="latex", axis=1)
        .apply(lambda _: bold.replace({True: "textbf:--rwrap;", False: ""}), axis=None)
    )
    body = styler.to_latex(hrules=True, column_format="l" * len(names) + "r" * (cells.shape[1] - len(names)))
    if _has(bases):  # a rule between the reference rows and the configurations
        lines = body.splitlines()
        at = lines.index("\\midrule") + 1 + len(bases)
        body = "\n".join([*lines[:at], "\\midrule", *lines[at:]]) + "\n"
    # the legend is our own text: no LaTeX specials but the two marks
    note = legend(comparisons, bases).replace("†", _GLYPHS["latex"][stats.WORSE])
    note = note.replace("≈", _GLYPHS["latex"][stats.SAME])
    note = " ".join([note + ".", *(latex_escape(n) for n in notes)])
    return (
        "% generated by python -m lora_exp.report; rows: results.csv, runs: its run_dirs column\n"
        f"{body}\\par\\smallskip{{\\footnotesize {note}}}\n"
    )


def to_html(df, cols: list[str], comparisons: Comparisons, bases=None) -> str:
    """The table as an HTML fragment: every value escaped, best cells bold."""
    cells, bold = display(df, cols, comparisons, "html", bases)
    css = bold.replace({True: "font-weight: bold", False: ""})
    if _has(bases):  # the reference rows read as such: italic on grey
        css.iloc[: len(bases)] = "font-style: italic; background: #f3f3f3"
    styler = (
        cells.style.hide(axis="index")
        .format(escape="html")
        .format_index(escape="html", axis=1)
        .apply(lambda _: css, axis=None)
    )
    return styler.to_html()


def to_markdown(df, cols: list[str], comparisons: Comparisons, bases=None) -> str:
    cells, bold = display(df, cols, comparisons, "md", bases)
    rows = [[f"**{v}**" if b else v for v, b in zip(r, br)] for r, br in zip(cells.values, bold.values)]
    return md_table(list(cells.columns), rows)


def md_table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; ``|`` and line breaks in a value are escaped."""
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def legend(comparisons: Comparisons, bases=None) -> str:
    text = stats.legend(comparisons.alpha, baseline=bool(comparisons.by_ref.get(VS_BASELINE)))
    if _has(bases):
        text += (
            f"; {BASE_LABEL}: the frozen base measured by each run before training (base/), "
            "a reference row, not compared for best"
        )
    return text


_LATEX_SPECIALS = {c: "\\" + c for c in "&%$#_{}"} | {
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def latex_escape(text: str) -> str:
    """Plain text (a protocol sentence, a path) safe inside a LaTeX paragraph."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def _num(value, digits: int = 3, metric: str | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "∞"
    return fmt(value, metric) if metric is not None else f"{value:.{digits}g}"


def comparison_rows(long):
    """The comparisons as a reader's table: Δ with its bootstrap CI, p, Holm p, effect, seeds for 80% power."""
    import pandas as pd

    rows = []
    for _, r in long.iterrows():
        if not r["test"]:
            continue  # the reference row itself, or a row with too few seeds to test
        m = r["metric"]
        rows.append(
            {
                "metric": m,
                "configuration": r["configuration"],
                "against": f"{r['reference']}: {r['against']}",
                "test": r["test"] or "-",
                "Δ [95% CI]": f"{_num(r['diff'], metric=m)} [{_num(r['diff_ci_lo'], metric=m)}, "
                f"{_num(r['diff_ci_hi'], metric=m)}]",
                "p": _num(r["p"]),
                "p (Holm)": _num(r["p_holm"]),
                "p (Wilcoxon)": _num(r["p_wilcoxon"]),
                "effect d": _num(r["effect"]),
                "seeds for 80% power": _num(r["seeds_80"], 6),
                "mark": r["mark"],
            }
        )
    return pd.DataFrame(rows)
