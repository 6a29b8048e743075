"""Is one configuration really better than another? Tests over seeds, corrected for multiplicity.

For each metric with a direction (``lora_exp.metrics.goal``), every configuration is compared with
the best one (best mean) and, when named, with a baseline:

- **the test**: a paired t-test (``scipy.stats.ttest_rel``) when both rows ran the same seeds, so
  the seed's own effect (data order, LoRA init) cancels; Welch's t-test (``ttest_ind``,
  ``equal_var=False``) otherwise. The Wilcoxon signed-rank test of paired rows is reported beside
  it as a check that does not assume normal differences (with 5 seeds its smallest two-sided p is
  0.0625, so it alone can never reach 0.05);
- **Holm-Bonferroni** correction. Against the best, the family is *every pair* of configurations:
  the best is picked after seeing the data, and correcting only its k-1 comparisons lets the
  family-wise error grow with k (about 0.07 at k=4, 0.11 at k=16 by simulation). Correcting all
  pairs holds it under the level whichever row turns out best. Against a baseline named in
  advance the family is its k-1 comparisons;
- **bootstrap** 95% CI of the difference (``scipy.stats.bootstrap``, BCa; paired rows resample the
  per-seed differences);
- **effect size**: Cohen's d_z (mean / std of per-seed differences) for paired rows, Cohen's d
  (pooled std) otherwise;
- for a pair that is not significant, the **seeds per configuration** a test would need for 80%
  power at the observed effect, from the noncentral t distribution at level alpha / m (the
  strictest Holm step, so the number is enough whatever the other p-values).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 10_000  # beyond this the seeds needed are reported as infinite
N_RESAMPLES = 9999

BEST, WORSE, SAME, BETTER = "best", "worse", "same", "better"  # marks of a row against its reference


@dataclass(frozen=True)
class Sample:
    """One configuration's values of one metric, with the seed of each value."""

    seeds: tuple[Any, ...]
    values: tuple[float, ...]

    @classmethod
    def of(cls, seeds, values) -> Sample:
        return cls(tuple(seeds), tuple(float(v) for v in values))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan


def paired(a: Sample, b: Sample) -> bool:
    """Whether two rows can be compared seed by seed: the same set of (distinct) seeds, at least two."""
    return a.n >= 2 and a.n == b.n and len(set(a.seeds)) == a.n and set(a.seeds) == set(b.seeds)


def _aligned(a: Sample, b: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``a`` and ``b`` in the same seed order."""
    bv = dict(zip(b.seeds, b.values))
    return np.asarray(a.values), np.asarray([bv[s] for s in a.seeds])


def p_value(a: Sample, b: Sample) -> tuple[str, float]:
    """``(test name, two-sided p)`` of the difference between ``a`` and ``b``; NaN p when untestable.

    Rows with no spread at all are the degenerate case scipy returns NaN for: identical values
    get p = 1 (nothing differs), a constant non-zero paired difference p = 0.
    """
    from scipy import stats

    if paired(a, b):
        x, y = _aligned(a, b)
        d = x - y
        if np.ptp(d) == 0:
            return "paired t", 1.0 if d[0] == 0 else 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # near-constant differences: p is still right
            return "paired t", float(stats.ttest_rel(x, y).pvalue)
    if a.n < 2 or b.n < 2:
        return "", math.nan
    if np.ptp(a.values) == 0 and np.ptp(b.values) == 0:
        return "Welch t", 1.0 if a.values[0] == b.values[0] else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return "Welch t", float(stats.ttest_ind(a.values, b.values, equal_var=False).pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and do not count in the family)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        # step k (0-based) multiplies by m - k; the running max keeps adjusted p monotone in raw p
        out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def effect_size(a: Sample, b: Sample) -> float:
    """Cohen's d_z of the paired differences ``a - b``, or Cohen's d with the pooled std; NaN if undefined."""
    if paired(a, b):
        x, y = _aligned(a, b)
        d = x - y
        sd = float(np.std(d, ddof=1))
        return _ratio(float(d.mean()), sd)
    if a.n < 2 or b.n < 2:
        return math.nan
    pooled = math.sqrt(((a.n - 1) * np.var(a.values, ddof=1) + (b.n - 1) * np.var(b.values, ddof=1)) / (a.n + b.n - 2))
    return _ratio(a.mean - b.mean, pooled)


def _ratio(diff: float, sd: float) -> float:
    if sd > 0:
        return diff / sd
    return 0.0 if diff == 0 else math.copysign(math.inf, diff)


def bootstrap_ci(a: Sample, b: Sample, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI of ``mean(a) - mean(b)`` (BCa; per-seed differences when paired); NaN when n < 2."""
    from scipy import stats

    rng = np.random.default_rng(seed)  # a report is reproducible: the same runs give the same interval
    if paired(a, b):
        x, y = _aligned(a, b)
        data, statistic = (x - y,), np.mean
    elif a.n >= 2 and b.n >= 2:
        data = (np.asarray(a.values), np.asarray(b.values))

        def statistic(u, v, axis=-1):
            return np.mean(u, axis=axis) - np.mean(v, axis=axis)
    else:
        return math.nan, math.nan
    if all(np.ptp(d) == 0 for d in data):  # no spread: every resample gives the same difference
        diff = a.mean - b.mean
        return diff, diff
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning on tiny samples: the interval is NaN then
        res = stats.bootstrap(data, statistic, n_resamples=N_RESAMPLES, confidence_level=level, rng=rng)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def power(n: int, effect: float, is_paired: bool, alpha: float) -> float:
    """Power of the two-sided t-test with ``n`` seeds per configuration at standardized ``effect``."""
    from scipy import stats

    df, nc = (n - 1, abs(effect) * math.sqrt(n)) if is_paired else (2 * n - 2, abs(effect) * math.sqrt(n / 2))
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(effect: float, is_paired: bool, alpha: float, target: float = POWER) -> float:
    """The smallest number of seeds per configuration reaching ``target`` power at ``effect``.

    Power grows with n, so a doubling search then bisection finds it in a few dozen noncentral-t
    evaluations. ``inf`` when the effect is zero or more than ``MAX_SEEDS`` seeds would be needed.
    """
    if not math.isfinite(effect):
        return 2.0 if math.isinf(effect) else math.nan
    if effect == 0:
        return math.inf
    lo, hi = 1, 2
    while power(hi, effect, is_paired, alpha) < target:
        lo, hi = hi, hi * 2
        if hi > MAX_SEEDS:
            return math.inf
    while hi - lo > 1:  # power(lo) < target <= power(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power(mid, effect, is_paired, alpha) >= target else (mid, hi)
    return float(hi)


def best_index(samples: list[Sample], goal: str) -> int | None:
    """The row with the best mean (first of ties); None when no row has a value."""
    means = np.array([s.mean for s in samples])
    if not np.isfinite(means).any():
        return None
    return int(np.nanargmin(means) if goal == "min" else np.nanargmax(means))


def _family(samples: list[Sample], ref: int, all_pairs: bool) -> tuple[dict, dict, int]:
    """Each row's raw test against ``ref``, its Holm-adjusted p, and the family size m.

    The family is every pair of rows (``all_pairs``, for the data-chosen best) or the rows against ``ref``.
    """
    k = len(samples)
    pairs = list(itertools.combinations(range(k), 2)) if all_pairs else [(i, ref) for i in range(k) if i != ref]
    tests = {pair: p_value(samples[pair[0]], samples[pair[1]]) for pair in pairs}
    adjusted = dict(zip(pairs, holm([p for _, p in tests.values()])))
    m = sum(math.isfinite(p) for _, p in tests.values())

    def pair(i: int) -> tuple[int, int]:
        return (min(i, ref), max(i, ref)) if all_pairs else (i, ref)

    others = [i for i in range(k) if i != ref]
    return {i: tests[pair(i)] for i in others}, {i: adjusted[pair(i)] for i in others}, m


def compare(samples: list[Sample], goal: str, reference: int | None = None, alpha: float = ALPHA, details: bool = True):
    """One row per configuration: its comparison with the best row (or with ``reference``, a baseline).

    Args:
        samples: each configuration's values, in table order.
        goal: ``"min"`` or ``"max"``, which way is better.
        reference: the baseline row; None compares with the best row (Holm over all pairs).
        alpha: the family-wise level.
        details: also the bootstrap interval, Wilcoxon p and seeds needed (the slow part; simulations
            that only need the marks switch it off).

    Returns:
        A DataFrame indexed like ``samples`` with columns ``mark`` (best/worse/same/better/""),
        ``test``, ``n``, ``diff`` (row minus reference), ``diff_ci_lo``, ``diff_ci_hi``, ``p``,
        ``p_holm``, ``p_wilcoxon``, ``effect`` and ``seeds_80`` (NaN where not applicable).
    """
    import pandas as pd

    vs_best = reference is None
    ref = best_index(samples, goal) if vs_best else reference
    rows = [_blank(s) for s in samples]
    if ref is None:
        return pd.DataFrame(rows)
    raw, adjusted, m = _family(samples, ref, all_pairs=vs_best)
    for i, s in enumerate(samples):
        row = rows[i]
        if i == ref or (vs_best and s.n and s.mean == samples[ref].mean):
            row["mark"] = BEST if vs_best else "baseline"
            if i == ref:
                continue
        r = samples[ref]
        row["test"], row["p"] = raw[i]
        row["p_holm"] = adjusted[i]
        row["diff"] = s.mean - r.mean if s.n and r.n else math.nan
        row["effect"] = effect_size(s, r)
        if details:
            row["p_wilcoxon"] = _wilcoxon(s, r)
            row["diff_ci_lo"], row["diff_ci_hi"] = bootstrap_ci(s, r)
        if math.isfinite(row["p_holm"]):
            significant = row["p_holm"] < alpha
            if not row["mark"]:
                row["mark"] = _mark(significant, row["diff"], goal)
            if details and not significant:
                row["seeds_80"] = seeds_needed(row["effect"], paired(s, r), alpha / max(m, 1))
    return pd.DataFrame(rows)


def _blank(s: Sample) -> dict[str, Any]:
    nan = math.nan
    return {
        "mark": "", "test": "", "n": s.n, "diff": nan, "diff_ci_lo": nan, "diff_ci_hi": nan,
        "p": nan, "p_holm": nan, "p_wilcoxon": nan, "effect": nan, "seeds_80": nan,
    }  # fmt: skip


def _mark(significant: bool, diff: float, goal: str) -> str:
    if not significant:
        return SAME
    better = diff < 0 if goal == "min" else diff > 0
    return BETTER if better else WORSE


def _wilcoxon(a: Sample, b: Sample) -> float:
    """Two-sided Wilcoxon signed-rank p of paired rows (exact for small n); NaN when unpaired."""
    from scipy import stats

    if not paired(a, b):
        return math.nan
    x, y = _aligned(a, b)
    if np.all(x == y):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.wilcoxon(x, y).pvalue)


def legend(alpha: float = ALPHA, baseline: bool = False) -> str:
    """What the marks mean, in words (the tables' legend)."""
    text = (
        f"bold: best mean; † significantly worse than the best, ≈ not distinguishable from it, at "
        f"family-wise level {alpha:g} (paired t-test over shared seeds, else Welch's t-test; "
        "Holm-Bonferroni over all pairs of configurations)"
    )
    if baseline:
        text += "; against the baseline: Holm over its comparisons"
    return text
