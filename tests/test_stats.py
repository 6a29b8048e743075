"""The report's statistics: error rates by simulation, paired vs Welch, Holm, power, and the marks on disk.

Synthetic run directories are written as a Hydra multirun writes them (``metrics.json``,
``.hydra/{overrides,config,hydra}.yaml``, ``history.jsonl``), so the report reads them through the
same code path as a real sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from lora_exp import metrics as M
from lora_exp.reporting import stats
from lora_exp.reporting.report import build_report

ALPHA = 0.05


def write_run(run_dir: Path, r: int, seed: int, val_loss: float, target="qv", extra=None, status="completed", **more):
    """A finished run directory as ``python -m lora_exp.train -m`` leaves it (the files the report reads)."""
    hydra = run_dir / ".hydra"
    hydra.mkdir(parents=True)
    overrides = [f"lora.r={r}", f"lora.target_modules={target}", f"seed={seed}", *(extra or [])]
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"seed": seed, "lora": {"r": r, "alpha": 16, "target_modules": [target]}, "model": {"name": "tiny"}}
    (hydra / "config.yaml").write_text(yaml.safe_dump(config))
    (hydra / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"model": "tiny_llama"}}}}))
    record = {
        M.STATUS: status,
        M.VAL_LOSS: val_loss,
        M.VAL_PPL: math.exp(val_loss),
        M.VAL_TOKEN_ACC: 1 - val_loss / 10,
        M.TRAINABLE_PARAMS: 1024 * r,
        M.TRAIN_LOSS: val_loss + 0.1,
        M.WANDB_GROUP: "multirun-synthetic",
        M.WANDB_PROJECT: "lora-exp-test",
        M.WANDB_MODE: "offline",
        **more,
    }
    if status != "completed":
        record = {M.STATUS: status, M.ERROR: "boom"}
    (run_dir / "metrics.json").write_text(json.dumps(record))
    history = [{"step": s, M.TRAIN_LOSS: val_loss + 1 / (s + 1)} for s in range(0, 10, 2)]
    (run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def write_sweep(root: Path, means: dict[int, float], seeds=range(5), noise=0.02, seed_sd=0.05, rng=0, **kw) -> Path:
    """One run per (rank, seed): loss = config mean + a per-seed effect shared by all configs + noise."""
    g = np.random.default_rng(rng)
    seed_effect = {s: g.normal(0, seed_sd) for s in seeds}
    job = 0
    for r, mean in means.items():
        for s in seeds:
            write_run(root / str(job), r, s, mean + seed_effect[s] + g.normal(0, noise), **kw)
            job += 1
    return root


# ---------------------------------------------------------------------------------------------
# the statistics alone


def test_holm_matches_the_step_down_procedure():
    # sorted p: .005 (x4) .01 (x3) .03 (x2) .04 (x1); monotone: .02 .03 .06 .06; NaN is not in the family
    adjusted = stats.holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, np.nan, 0.02])
    assert list(stats.holm([0.5, 0.9])) == [1.0, 1.0]  # never below an earlier step's adjusted p


def _null_sweep_has_false_positive(rng, k: int, paired: bool) -> bool:
    seed_effect = rng.normal(0, 1.0, 5)
    samples = []
    for c in range(k):
        seeds = range(5) if paired else range(5 * c, 5 * c + 5)  # disjoint seeds: no pairing possible
        values = (seed_effect if paired else rng.normal(0, 1.0, 5)) + rng.normal(0, 0.5, 5)
        samples.append(stats.Sample.of(seeds, values))
    marks = stats.compare(samples, "min", details=False)["mark"]
    return bool((marks == stats.WORSE).any())


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "welch"])
def test_no_true_difference_keeps_the_familywise_error_at_alpha(paired):
    """Over many sweeps where every configuration is the same, "significantly worse than the best" is
    claimed in at most alpha of them, although the best is picked after seeing the data."""
    rng = np.random.default_rng(1234)
    sweeps = 400
    rate = np.mean([_null_sweep_has_false_positive(rng, k=4, paired=paired) for _ in range(sweeps)])
    assert rate <= ALPHA


def test_an_injected_difference_of_known_size_is_found_with_its_size():
    rng = np.random.default_rng(7)
    delta, found, effects = 1.5, 0, []
    for _ in range(100):
        seed_effect = rng.normal(0, 2.0, 5)  # large seed-to-seed spread that pairing removes
        values = [seed_effect + rng.normal(0, 0.5, 5) + shift for shift in (0.0, 0.0, delta)]
        samples = [stats.Sample.of(range(5), v) for v in values]
        result = stats.compare(samples, "min", details=False)
        found += result.at[2, "mark"] == stats.WORSE
        effects.append(result.at[2, "diff"])
    # paired differences have sd 0.5 * sqrt(2): d_z = 2.1, power with 5 seeds at alpha/3 is about 0.85
    assert found >= 75
    assert np.mean(effects) == pytest.approx(delta, abs=0.1)


def test_seeds_needed_give_the_promised_power():
    assert stats.seeds_needed(0.5, True, 0.05) == 34  # the textbook paired-t figures (G*Power)
    assert stats.seeds_needed(0.5, False, 0.05) == 64
    n = int(stats.seeds_needed(1.0, True, 0.05))
    rng = np.random.default_rng(3)
    d = rng.normal(1.0, 1.0, (4000, n))
    power = np.mean(sps.ttest_1samp(d, 0, axis=1).pvalue < 0.05)
    assert 0.78 <= power <= 0.86
    assert stats.seeds_needed(0.0, True, 0.05) == math.inf


def test_rows_with_the_same_seeds_are_paired_others_get_welch():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 1.0, 5)
    a = stats.Sample.of(range(5), seed_effect + rng.normal(0, 0.01, 5))
    b = stats.Sample.of(range(5), seed_effect + 0.05 + rng.normal(0, 0.01, 5))
    b_shuffled = stats.Sample.of([4, 3, 2, 1, 0], list(b.values)[::-1])  # same runs, listed in another order
    c = stats.Sample.of(range(10, 15), b.values)  # other seeds
    test, p = stats.p_value(b, a)
    assert test == "paired t" and p == pytest.approx(sps.ttest_rel(b.values, a.values).pvalue) and p < 0.01
    assert stats.p_value(b_shuffled, a) == (test, pytest.approx(p))  # pairs by seed, not by position
    test, p = stats.p_value(c, a)
    assert test == "Welch t" and p == pytest.approx(sps.ttest_ind(c.values, a.values, equal_var=False).pvalue)
    assert p > 0.5  # the seed spread hides the difference without pairing
    assert stats.effect_size(b, a) == pytest.approx(np.mean(np.subtract(b.values, a.values)) / np.std(
        np.subtract(b.values, a.values), ddof=1))  # fmt: skip
    lo, hi = stats.bootstrap_ci(b, a)
    assert lo < b.mean - a.mean < hi and 0 < lo and hi - lo < 0.05


def test_baseline_comparisons_mark_better_and_worse():
    samples = [stats.Sample.of(range(5), np.arange(5.0) + shift + [0, 0.01, -0.01, 0.02, 0]) for shift in (0, 1, -1)]
    result = stats.compare(samples, "min", reference=0)
    assert list(result["mark"]) == ["baseline", stats.WORSE, stats.BETTER]


# ---------------------------------------------------------------------------------------------
# the report on synthetic run directories


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Three ranks x 5 seeds: r=8 best, r=16 indistinguishable from it, r=4 clearly worse; one failed run."""
    root = write_sweep(tmp_path_factory.mktemp("sweep") / "multirun", {4: 1.30, 8: 1.00, 16: 1.001})
    write_run(root / "99", 32, 0, 0.0, status="failed")
    out = build_report([root], online=False, baseline=["lora.r=16"])
    return root, out


def test_marks_and_legend_in_tex_md_and_html(report):
    _, out = report
    tex = (out / "results.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex
    row = {line.split("&")[0].strip(): line for line in tex.splitlines() if "&" in line}
    assert r"\textbf{" in row["8"] and r"$^{\dagger}$" in row["4"] and r"$^{\approx}$" in row["16"]
    assert "Holm" in tex and "paired t-test" in tex and "0.05" in tex  # the legend
    md = (out / "report.md").read_text()
    table = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "**" in table["8"] and "†" in table["4"] and "≈" in table["16"]
    assert "Best configuration by val/loss: r=8" in md and "Baseline: r=16" in md
    html = (out / "report.html").read_text()
    assert "font-weight: bold" in html and "†" in html and "≈" in html and "Holm" in html


def test_results_csv_has_p_values_effects_and_the_ci_of_each_difference(report):
    root, out = report
    df = pd.read_csv(out / "results.csv").set_index("lora.r")
    col = f"{M.VAL_LOSS}:vs_best"
    assert df.at[4, f"{col}:mark"] == stats.WORSE and df.at[4, f"{col}:p_holm"] < ALPHA
    assert df.at[16, f"{col}:mark"] == stats.SAME and df.at[16, f"{col}:seeds_80"] > 5
    assert df.at[4, f"{col}:test"] == "paired t"
    assert df.at[4, f"{col}:diff_ci_lo"] < df.at[4, f"{col}:diff"] < df.at[4, f"{col}:diff_ci_hi"]
    # the p-value is scipy's paired t-test on the runs' own metrics.json values
    values = {r: [] for r in (4, 8)}
    for d in sorted(root.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 1e9):
        if (d / "metrics.json").is_file() and (d / ".hydra").is_dir():
            r = int(yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())[0].split("=")[1])
            if r in values:
                values[r].append(json.loads((d / "metrics.json").read_text())[M.VAL_LOSS])
    assert df.at[4, f"{col}:p"] == pytest.approx(sps.ttest_rel(values[4], values[8]).pvalue)
    assert df.at[4, f"{col}:effect"] > 2
    assert df.at[32, "n"] == 0 and df.at[32, "n_failed"] == 1
    assert df.at[8, f"{M.VAL_LOSS}:vs_baseline:mark"] == stats.SAME
    assert df.at[4, f"{M.VAL_TOKEN_ACC}:vs_best:mark"] == stats.WORSE  # higher is better there
    long = pd.read_csv(out / "comparisons.csv")
    assert set(long["reference"]) == {"best", "baseline"}


def test_summary_run_holds_the_comparison_table_offline(report):
    _, out = report
    (offline,) = list((out / "wandb").glob("offline-run-*"))
    data = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"multirun-synthetic" in data and b"report" in data  # the sweep's group, job_type="report"
    (table,) = list(offline.glob("files/media/table/comparison_*.table.json"))
    content = json.loads(table.read_text())
    assert {"configuration", "p (Holm)", "mark"} <= set(content["columns"])
    marks = {row[content["columns"].index("configuration")]: row[-1] for row in content["data"]}
    assert any(m == stats.WORSE for m in marks.values())
    assert list(offline.glob("files/media/table/results_*.table.json"))


def test_latex_escapes_every_special_character(tmp_path):
    weird = "a_b$c{d}~e^f%g&h#i"
    root = tmp_path / "sweep"
    for job, (r, s) in enumerate([(4, 0), (4, 1), (8, 0), (8, 1)]):
        write_run(root / str(job), r, s, 1.0 + r / 100 + s / 1000, extra=[f"+tag={weird if r == 4 else 'plain'}"])
    tex = (build_report([root], online=False) / "results.tex").read_text()
    assert r"a\_b\$c\{d\}\textasciitilde e\textasciicircum f\%g\&h\#i" in tex
    assert "tag" in tex and weird not in tex


def test_bad_baseline_is_one_line_and_nothing_is_written(tmp_path, capsys):
    from lora_exp import report as report_cmd

    root = write_sweep(tmp_path / "sweep", {4: 1.0, 8: 1.1}, seeds=range(2))
    for baseline, message in [("lora.rank=4", "not a configuration column"), ("lora.r=5", "matches no configuration")]:
        with pytest.raises(SystemExit) as exit_info:
            report_cmd.main([str(root), "--offline", "--baseline", baseline])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("lora_exp.report: error: --baseline") and message in err
    assert not (root / "report").exists()


def test_compute_columns_totals_and_flops_plot_when_runs_record_them(tmp_path):
    root = write_sweep(
        tmp_path / "sweep", {4: 1.0, 8: 0.9}, seeds=range(3),
        **{M.COMPUTE_TRAIN_FLOPS: 2e12, M.COMPUTE_DEVICE_HOURS: 0.25},
    )  # fmt: skip
    out = build_report([root], online=False)
    df = pd.read_csv(out / "results.csv")
    assert list(df["compute/train_flops:sum"]) == [6e12, 6e12] and list(df["compute/device_hours:sum"]) == [0.75, 0.75]
    md = (out / "report.md").read_text()
    assert "1.200e+13 training FLOPs" in md and "1.500 device-hours" in md and "## Compute" in md
    assert (out / "metric_vs_flops.png").read_bytes()[:4] == b"\x89PNG"


def test_heatmap_text_is_dark_on_light_cells_and_light_on_dark():
    from matplotlib import colormaps

    from lora_exp.reporting.plots import text_color

    assert text_color(colormaps["viridis"](1.0)) == "black"  # yellow
    assert text_color(colormaps["viridis"](0.0)) == "white"  # dark purple
    assert text_color((1, 1, 1, 1)) == "black" and text_color((0, 0, 0, 1)) == "white"


def test_wandb_report_reads_swept_values_as_config_keys():
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    from lora_exp.reporting.wandb_report import report_panels

    scatter, *_, parallel = report_panels(wr, M.VAL_LOSS)
    assert scatter.x == wr.Config("lora.r") and scatter.y == wr.SummaryMetric(M.VAL_LOSS)
    accessors = [c._to_model().accessor for c in parallel.columns]
    assert accessors[:2] == ["config:lora.value.r", "config:lora.value.alpha"]
