"""The numbers a manuscript cites, as LaTeX macros (``numbers.tex``) with their meaning (README).

Every macro is ``\\newcommand{\\Name}{value}`` with a name of letters only (LaTeX control words
cannot hold digits, ``/`` or ``_``) built predictably from what it is:

- ``\\Best<Metric><Stat>``: the best configuration by that metric (``\\BestValLossMean``,
  ``\\BestValLossCILow``, ``\\BestValLossConfig``, ...);
- ``\\Config<Letter><Metric><Stat>``: every configuration, lettered A, B, ... in table order
  (``\\ConfigBValLossMean``), and ``\\Config<Letter>Label``;
- ``\\<Metric>Config<Letter>VsBest<Field>``: each configuration's comparison with the best one
  (``Diff``, ``DiffCILow``, ``DiffCIHigh``, ``P``, ``PHolm``, ``Significant``); ``VsBaseline``
  with ``--baseline``;
- ``\\Total...``: the sweep's compute (``\\TotalTrainFlops``, ``\\TotalDeviceHours``) and counts.

Digits inside a metric name are spelled (``val/probe2/loss`` -> ``ValProbeTwoLoss``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lora_exp import metrics as M
from lora_exp.reporting import stats
from lora_exp.reporting.collect import COMPUTE_TOTALS, TOTAL, config_label
from lora_exp.reporting.comparisons import VS_BASELINE, VS_BEST, Comparisons, compared_metrics
from lora_exp.reporting.tables import fmt, table_metrics

_DIGITS = "Zero One Two Three Four Five Six Seven Eight Nine".split()
_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_STAT_NAMES = {"mean": "Mean", "std": "Std", "ci95_lo": "CILow", "ci95_hi": "CIHigh"}
_TOTAL_NAMES = {M.COMPUTE_TRAIN_FLOPS: "TotalTrainFlops", M.COMPUTE_DEVICE_HOURS: "TotalDeviceHours"}


@dataclass(frozen=True)
class Number:
    """One citable number: its macro name (letters only), its LaTeX value and what it means."""

    name: str
    value: str
    meaning: str


def macro_name(*parts: str) -> str:
    """``macro_name("Best", "val/loss", "Mean") == "BestValLossMean"``: CamelCase words, digits spelled."""
    words = []
    for part in parts:
        spelled = re.sub(r"\d", lambda m: f" {_DIGITS[int(m.group())]} ", part)
        words += [w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z]+", spelled) if w]
    name = "".join(words)
    if not re.fullmatch(r"[A-Za-z]+", name):
        raise ValueError(f"no macro name can be made of {parts!r}")
    return name


def letter(index: int) -> str:
    """Row 0 -> A, 25 -> Z, 26 -> AA: a configuration's letter, as spreadsheets number columns."""
    out = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        out = chr(ord("A") + rest) + out
    return out


def latex_escape(text: str) -> str:
    """Plain text safe in LaTeX's text mode (configuration labels, metric names)."""
    return "".join(_LATEX_SPECIALS.get(c, c) for c in str(text))


def latex_value(value, metric: str) -> str:
    """A number as the tables show it; a minus sign in math mode, thousands separators safe in math."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return r"\ensuremath{\infty}" if isinstance(value, float) and math.isinf(value) else "--"
    text = fmt(value, metric).replace(",", "{,}")
    return rf"\ensuremath{{{text}}}" if text.startswith("-") else text


def latex_sci(value: float, digits: int = 3) -> str:
    """``1.23e+15`` as ``\\ensuremath{1.23\\times10^{15}}`` (FLOPs, small p-values)."""
    if value == 0 or not math.isfinite(value):
        return latex_value(value, "")
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return rf"\ensuremath{{{mantissa}\times10^{{{int(exponent)}}}}}"


def latex_p(p: float) -> str:
    """A p-value: three decimals, or scientific below 0.001 (a paper never prints 0.000)."""
    if p is None or not math.isfinite(p):
        return "--"
    return latex_sci(p, 2) if 0 < p < 1e-3 else f"{p:.3f}"


def citable_numbers(df, cols: list[str], comps: Comparisons, runs, main_metric: str) -> list[Number]:
    """Every macro of ``numbers.tex``, in the order a reader meets them: totals, best, rows, comparisons."""
    metrics = [m for m in table_metrics(df) if m in compared_metrics(table_metrics(df))]
    if main_metric in compared_metrics([main_metric]) and f"{main_metric}:mean" in df and main_metric not in metrics:
        metrics.insert(0, main_metric)
    out = _totals(df, runs, comps)
    for m in metrics:
        out += _best(df, cols, comps, m)
    for i in df.index:
        out += _row(df, cols, i, metrics)
    for m in metrics:
        for ref in (VS_BEST, VS_BASELINE):
            out += _comparisons(df, cols, comps, m, ref)
    names = [n.name for n in out]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:  # two metrics spelled alike (val/a_b and val/aB): a citation would be ambiguous
        raise ValueError(f"numbers.tex: macro names made twice: {sorted(duplicates)}")
    return out


def _totals(df, runs, comps: Comparisons) -> list[Number]:
    ok = sum(r.ok for r in runs)
    out = [
        Number("NumRuns", str(len(runs)), "run directories read (completed or not)"),
        Number("NumCompletedRuns", str(ok), "runs that completed (the statistics use only these)"),
        Number("NumConfigs", str(len(df)), "configurations (rows of the results table)"),
        Number("SignificanceLevel", f"{comps.alpha:g}", "family-wise level of every significance mark"),
    ]
    for key in COMPUTE_TOTALS:
        if f"{key}:{TOTAL}" in df:
            total = float(df[f"{key}:{TOTAL}"].sum())
            value = latex_sci(total) if key.endswith("flops") else f"{total:.3f}"
            out.append(Number(_TOTAL_NAMES[key], value, f"sum of {key} over every run, failed ones included"))
    return out


def _best_row(comps: Comparisons, metric: str):
    frame = comps.get(metric)
    if frame is None:
        return None
    hits = frame.index[frame["mark"] == stats.BEST]
    return hits[0] if len(hits) else None


def _best(df, cols: list[str], comps: Comparisons, metric: str) -> list[Number]:
    i = _best_row(comps, metric)
    if i is None:
        return []
    row, label = df.loc[i], config_label(df.loc[i], cols)
    n = int(row[f"{metric}:n"])
    where = f"of the best configuration by {metric} ({label}, {M.goal(metric)} is better), over {n} seeds"
    out = [
        Number(macro_name("Best", metric, "Config"), latex_escape(label), f"the best configuration by {metric}"),
        Number(macro_name("Best", metric, "Config", "Letter"), letter(i), "its letter (the Config* macros)"),
        Number(macro_name("Best", metric, "Seeds"), str(n), f"completed seeds behind it ({metric})"),
    ]
    for stat, word in _STAT_NAMES.items():
        meaning = f"{_stat_words(stat)} {metric} {where}"
        out.append(Number(macro_name("Best", metric, word), latex_value(row[f"{metric}:{stat}"], metric), meaning))
    return out


def _stat_words(stat: str) -> str:
    return {"mean": "mean", "std": "sample std of", "ci95_lo": "95% CI low of mean", "ci95_hi": "95% CI high of mean"}[
        stat
    ]


def _row(df, cols: list[str], i, metrics: list[str]) -> list[Number]:
    tag = f"Config{letter(i)}"
    label = config_label(df.loc[i], cols)
    out = [Number(f"{tag}Label", latex_escape(label), f"configuration {letter(i)} (table row {i + 1})")]
    for m in metrics:
        for stat, word in _STAT_NAMES.items():
            meaning = f"{_stat_words(stat)} {m} of {label} over {int(df.at[i, f'{m}:n'])} seeds"
            out.append(Number(macro_name(tag, m, word), latex_value(df.at[i, f"{m}:{stat}"], m), meaning))
    return out


def _comparisons(df, cols: list[str], comps: Comparisons, metric: str, ref: str) -> list[Number]:
    frame = comps.get(metric, ref)
    if frame is None:
        return []
    against = "the best" if ref == VS_BEST else "the baseline"
    out = []
    for i in frame.index:
        r = frame.loc[i]
        if not r["test"]:
            continue  # the reference itself, or too few seeds to test
        base = macro_name(metric, f"Config{letter(i)}", "Vs", ref.removeprefix("vs_"))
        label = config_label(df.loc[i], cols)
        significant = bool(math.isfinite(r["p_holm"]) and r["p_holm"] < comps.alpha)
        what = f"{metric}: {label} minus {against} ({r['test']}, {'significant' if significant else 'not significant'})"
        out += [
            Number(f"{base}Diff", latex_value(r["diff"], metric), f"difference of means, {what}"),
            Number(f"{base}DiffCILow", latex_value(r["diff_ci_lo"], metric), f"bootstrap 95% CI low, {what}"),
            Number(f"{base}DiffCIHigh", latex_value(r["diff_ci_hi"], metric), f"bootstrap 95% CI high, {what}"),
            Number(f"{base}P", latex_p(r["p"]), f"two-sided p, uncorrected, {what}"),
            Number(f"{base}PHolm", latex_p(r["p_holm"]), f"Holm-corrected p, {what}"),
            Number(f"{base}Significant", "yes" if significant else "no", f"PHolm below {comps.alpha:g}, {what}"),
        ]
    return out


def numbers_tex(numbers: list[Number], command: str) -> str:
    """``numbers.tex``: one ``\\newcommand`` per number, its meaning as a comment above it."""
    lines = [
        f"% generated by {command}",
        "% \\input{numbers.tex} in the preamble; every macro is listed with its meaning in README.md",
    ]
    for n in numbers:
        lines += [f"% {n.meaning}", f"\\newcommand{{\\{n.name}}}{{{n.value}}}"]
    return "\n".join(lines) + "\n"
