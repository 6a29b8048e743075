"""The report's fair-comparison rows (issue 15): tuned grids, the base model and full fine-tuning beside LoRA."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from lora_exp import metrics as M
from lora_exp.reporting.report import build_report, stat_columns
from lora_exp.runs.rundir import read_metrics
from test_stats import write_run

BASE = {M.base(M.VAL_LOSS): 2.0, M.base(M.VAL_TOKEN_ACC): 0.5, M.DATA_FINGERPRINT: "abc123def456"}


def _md_rows(md: str) -> list[str]:
    """The results table's body lines of report.md (the first table)."""
    start = md.index("| method |")
    lines = md[start:].split("\n\n")[0].splitlines()
    return lines[2:]


# ---------------------------------------------------------------------------------------------
# a real tuned grid


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """The tuned grid of tests/test_tuned_sweep.py: 2 target sets x lrs [1e-5, 3e-2] x seeds [0, 1]."""
    sweep = tmp_path_factory.mktemp("tuned") / "sweep"
    run_cli(
        "lora_exp.train", "hparams_search=tuned_grid", "model=tiny_llama", "debug=quick", "logger=none",
        "trainer.max_steps=2", "trainer.limit_val_batches=1", "data.num_train=16", "data.num_val=8",
        "hydra.sweeper.lrs=[1e-5,3e-2]", "hydra.sweeper.seeds=[0,1]", f"hydra.sweep.dir={sweep}", cwd=sweep.parent,
    )  # fmt: skip
    run_cli("lora_exp.report", str(sweep), "--offline", cwd=sweep.parent)
    return sweep


def test_a_tuned_grid_reports_the_replicates_at_each_chosen_rate(tuned: Path):
    tuning = json.loads((tuned / "tuning.json").read_text())
    out = tuned / "report"
    df = pd.read_csv(out / "results.csv").set_index("lora.target_modules")
    assert sorted(df.index) == ["all_linear", "qv"]  # one row per configuration, not per searched rate
    assert "optim.lr" not in df.columns
    for c in tuning["configs"]:
        row = df.loc[c["name"].split("=")[1]]
        assert row["tuned lr"] == c["chosen_lr"]
        assert json.loads(row["lr candidates"]) == pytest.approx(c["candidates"])
        assert sorted(row["run_dirs"].split(";")) == sorted(c["runs"]) and row["n"] == 2
        values = [read_metrics(Path(d))[M.VAL_LOSS] for d in c["runs"]]
        assert row[f"{M.VAL_LOSS}:mean"] == pytest.approx(statistics.mean(values))
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4  # the 2 search runs at the other rate are not runs of the report
    md = (out / "report.md").read_text()
    protocol = f"Protocol: {tuning['protocol']}; the 2 search run(s) at the other rates are not rows"
    assert protocol in md and md.index(protocol) < md.index("| method |")  # stated above the tables
    assert "| tuned lr |" in md.splitlines()[md.splitlines().index(_md_rows(md)[0]) - 2]
    section = md[md.index("## Learning-rate tuning") :]
    for c in tuning["configs"]:
        chosen = f"{c['chosen_lr']:g}"
        line = next(x for x in section.splitlines() if f"target_modules={c['name'].split('=')[1]} |" in x)
        assert line.endswith(f"| {chosen} |")  # the chosen rate named per configuration
        assert f"**{c['candidates'][chosen]:.4f}**" in line  # its score bold beside the other candidate's
    tex = (out / "results.tex").read_text()
    assert "tuned lr" in tex and "learning rate tuned per configuration on val/loss" in tex
    html = (out / "report.html").read_text()
    assert "tuned lr" in html and "Learning-rate tuning" in html and tuning["protocol"] in html
    base = pd.read_csv(out / "baselines.csv")
    assert len(base) == 1 and base.at[0, "n"] == 4  # the base measured by each replicate


def test_search_runs_of_a_moved_sweep_are_left_out_and_an_all_failed_search_is_a_failed_row(tmp_path):
    sweep = tmp_path / "moved"
    for name, lrs, status in [("lora.r=4", ("0.001", "0.01"), "completed"), ("lora.r=8", ("0.001", "0.01"), "failed")]:
        for lr in lrs:
            for seed in (0, 1) if status == "completed" and lr == "0.01" else (0,):
                run = sweep / name / f"lr={lr}" / f"seed={seed}"
                write_run(run, int(name[-1]), seed, 1.0 + float(lr), extra=[f"optim.lr={lr}"], status=status)
    configs = [
        # paths as the sweep saw them before it was moved: only their last three parts count
        {"name": "lora.r=4", "candidates": {"0.001": 1.001, "0.01": 1.01}, "chosen_lr": 0.01,
         "runs": [f"elsewhere/lora.r=4/lr=0.01/seed={s}" for s in (0, 1)]},
        {"name": "lora.r=8", "candidates": {"0.001": None, "0.01": None}, "chosen_lr": None},
    ]  # fmt: skip
    doc = {"protocol": "learning rate tuned per configuration", "metric": M.VAL_LOSS, "seeds": [0, 1]}
    (sweep / "tuning.json").write_text(json.dumps({**doc, "configs": configs}))
    out = build_report([sweep], online=False)
    df = pd.read_csv(out / "results.csv").set_index("lora.r")
    assert list(df.index) == [4, 8] and "optim.lr" not in df.columns
    assert df.at[4, "n"] == 2 and df.at[4, "tuned lr"] == 0.01
    assert df.at[8, "n"] == 0 and df.at[8, "n_failed"] == 2  # the failed search stays visible
    md = (out / "report.md").read_text()
    assert "| failed | failed | none (every candidate failed) |" in md
    assert "the 1 search run(s) at the other rates are not rows" in md


# ---------------------------------------------------------------------------------------------
# the base model and full fine-tuning beside LoRA


def _mixed(root: Path, base=BASE, full_loss=0.9) -> Path:
    """LoRA r=8 and r=16 and a full fine-tune, 3 seeds each, in one sweep directory."""
    job = 0
    for r, loss in ((8, 1.0), (16, 0.95)):
        for s in range(3):
            write_run(root / str(job), r, s, loss + 0.01 * s + 0.003 * (s == 2) * r, method="lora", **base)
            job += 1
    for s in range(3):
        more = {**base, "method": "full", M.TRAINABLE_PARAMS: 134_000_000}
        write_run(root / str(job), 16, s, full_loss + 0.01 * s, extra=["method=full"], **more)
        job += 1
    return root


def test_base_and_full_fine_tuning_are_rows_beside_lora(tmp_path):
    root = _mixed(tmp_path / "sweep")
    out = build_report([root], online=False)
    df = pd.read_csv(out / "results.csv")
    assert list(df["method"]) == ["full", "lora", "lora"]
    assert {m for m, _ in stat_columns(df)} <= set(M.REPORT_METRICS)  # vs_base columns are not statistics
    full = df[df["method"] == "full"].iloc[0]
    assert pd.isna(full["lora.r"]) and pd.isna(full["lora.target_modules"])  # no adapter: no rank or targets
    assert full[f"{M.TRAINABLE_PARAMS}:mean"] == 134_000_000
    # each configuration's difference from the base: per run, against that run's own base measurement
    r8 = df[df["lora.r"] == 8].iloc[0]
    diffs = [read_metrics(Path(d))[M.VAL_LOSS] - 2.0 for d in r8["run_dirs"].split(";")]
    assert r8[f"{M.VAL_LOSS}:vs_base:diff"] == pytest.approx(statistics.mean(diffs))
    assert r8[f"{M.VAL_LOSS}:vs_base:diff_ci_lo"] < r8[f"{M.VAL_LOSS}:vs_base:diff"] < 0
    assert r8[f"{M.VAL_LOSS}:vs_base:p"] < 0.01
    long = pd.read_csv(out / "comparisons.csv")
    against = long[(long["reference"] == "base") & (long["metric"] == M.VAL_LOSS)].set_index("configuration")
    assert against.at["method=lora, r=8, alpha=16, target_modules=qv", "diff"] == pytest.approx(statistics.mean(diffs))
    base = pd.read_csv(out / "baselines.csv")
    assert list(base["method"]) == ["base"] and base.at[0, "n"] == 9
    assert base.at[0, f"{M.VAL_LOSS}:mean"] == 2.0 and base.at[0, "base model"] == "tiny_llama"
    md = (out / "report.md").read_text()
    rows = _md_rows(md)
    assert rows[0].startswith("| base model (no training) | - | - | - | 9 | - | 2.0000")
    assert "**" not in rows[0] and "†" not in rows[0]  # a reference row: never marked
    assert rows[1].startswith("| full fine-tuning | - | - | - | 3 | 0 | **0.9")  # the best here
    assert rows[2].startswith("| LoRA | 8 |") and "†" in rows[2]
    assert "## Against the base model" in md and "reference row, not compared for best" in md
    tex = (out / "results.tex").read_text().splitlines()
    at = next(i for i, line in enumerate(tex) if line.startswith("base model (no training)"))
    assert tex[at - 1] == tex[at + 1] == r"\midrule" and tex[at + 2].startswith("full fine-tuning")
    html = (out / "report.html").read_text()
    assert "base model (no training)" in html and "full fine-tuning" in html and "font-style: italic" in html


def test_a_base_better_than_every_configuration_is_still_not_the_best(tmp_path):
    root = _mixed(tmp_path / "sweep", base={**BASE, M.base(M.VAL_LOSS): 0.1})
    out = build_report([root], online=False)
    md = (out / "report.md").read_text()
    assert "Best configuration by val/loss: method=full." in md
    assert "**" not in _md_rows(md)[0]
    df = pd.read_csv(out / "results.csv")
    assert (df[f"{M.VAL_LOSS}:vs_base:diff"] > 0).all()  # every configuration worse than the base


def test_one_base_row_per_base_model_and_eval_data(tmp_path):
    root = tmp_path / "sweep"
    for job, (r, s, data) in enumerate(
        [(8, 0, "aaaa1111"), (8, 1, "aaaa1111"), (16, 0, "bbbb2222"), (16, 1, "bbbb2222")]
    ):
        base = {**BASE, M.DATA_FINGERPRINT: data, M.base(M.VAL_LOSS): 2.0 if data.startswith("a") else 3.0}
        write_run(root / str(job), r, s, 1.0 + s / 100, **base)
    out = build_report([root], online=False)
    base = pd.read_csv(out / "baselines.csv").set_index("data fingerprint")
    assert base.at["aaaa1111", f"{M.VAL_LOSS}:mean"] == 2.0 and base.at["bbbb2222", f"{M.VAL_LOSS}:mean"] == 3.0
    assert list(base["n"]) == [2, 2]
    md = (out / "report.md").read_text()
    assert "| base model (no training), data aaaa1111 |" in md and "| base model (no training), data bbbb2222 |" in md


def test_runs_without_a_base_measurement_show_no_base_row(tmp_path):
    root = tmp_path / "sweep"
    for job, (r, s) in enumerate([(8, 0), (8, 1), (16, 0), (16, 1)]):
        write_run(root / str(job), r, s, 1.0 + r / 100 + s / 1000)
    out = build_report([root], online=False)
    md = (out / "report.md").read_text()
    assert "base model" not in md and "| method |" not in md and not (out / "baselines.csv").exists()
