"""A real multirun of the tiny Llama: separate run dirs and W&B runs, failed points recorded, the report."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from conftest import compose, run_cli
from lora_exp import metrics as M
from lora_exp.runs.rundir import read_metrics

# 2 ranks x 2 target sets x 2 seeds; `bad-name` is rejected by validation: 4 runs train, 4 fail
GRID = ("lora.r=4,8", "lora.target_modules=qv,bad-name", "seed=0,1")
SMALL = (
    "model=tiny_llama",
    "debug=quick",
    "logger=wandb",
    "logger.wandb.num_samples=2",
    "logger.wandb.max_new_tokens=4",
    "trainer.max_steps=2",
    "data.num_train=16",
    "data.num_val=8",
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = run_cli(
        "lora_exp.train", "-m", *SMALL, *GRID, f"hydra.sweep.dir={sweep_dir}", cwd=sweep_dir.parent, check=False
    )
    # the sweep goes on past failed points, then exits non-zero listing each one (a scheduler sees the failure)
    assert proc.returncode == 1 and "4 sweep point(s) failed" in proc.stderr, proc.stderr[-2000:]
    return sweep_dir


def _runs(sweep_dir: Path) -> dict[Path, dict]:
    return {d: read_metrics(d) for d in sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))}


def _wandb_file(run_dir: Path) -> bytes:
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    (data,) = list(offline.glob("run-*.wandb"))
    return data.read_bytes()


def test_each_job_has_its_own_run_dir_and_offline_wandb_run_in_one_group(sweep):
    runs = _runs(sweep)
    assert len(runs) == 8
    done = {d: r for d, r in runs.items() if r[M.STATUS] == M.STATUS_COMPLETED}
    assert len(done) == 4
    ids = {r[M.WANDB_RUN_ID] for r in done.values()}
    assert len(ids) == 4  # never merged into another job's run
    assert {r[M.WANDB_GROUP] for r in done.values()} == {f"{sweep.parent.name}-{sweep.name}"}
    assert {r[M.WANDB_MODE] for r in done.values()} == {"offline"}
    for d, r in done.items():
        data = _wandb_file(d)
        assert r[M.WANDB_RUN_ID] in (d / "wandb" / "latest-run").resolve().name
        overrides = (d / ".hydra" / "overrides.yaml").read_text()
        swept_r = "lora.r=4" if "lora.r=4" in overrides else "lora.r=8"
        assert swept_r.encode() in data  # swept values as tags and config
        assert r[M.WANDB_GROUP].encode() in data
        assert f"adapter-{r[M.WANDB_RUN_ID]}".encode() in data  # the adapter artifact
        assert b"best/val/loss" in data  # summary with best values
        # the samples table of held-out generations
        (table,) = list((d / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
        rows = json.loads(table.read_text())
        assert rows["columns"] == ["prompt", "reference", "generation", "exact_match"]
        assert len(rows["data"]) == 2
        # final and best values in metrics.json, the metric history beside it
        assert r[M.best(M.VAL_LOSS)] <= r[M.base(M.VAL_LOSS)] + 1e-6 or M.best(M.VAL_LOSS) in r
        assert M.TRAIN_LOSS in r and (d / "history.jsonl").is_file()


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(sweep):
    failed = {d: r for d, r in _runs(sweep).items() if r[M.STATUS] == M.STATUS_FAILED}
    assert len(failed) == 4
    for d, r in failed.items():
        assert "lora.target_modules" in r[M.ERROR]
        assert "bad-name" in (d / ".hydra" / "overrides.yaml").read_text()


def test_report_rows_and_aggregates_come_from_the_runs(sweep):
    import pandas as pd
    from scipy import stats

    run_cli("lora_exp.report", str(sweep), "--offline", cwd=sweep.parent)
    out = sweep / "report"
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4  # (r, targets) configurations; seeds aggregated
    # every metric column names a real key of lora_exp.metrics
    from lora_exp.reporting.report import STATS, stat_columns

    cols = stat_columns(df)
    assert cols and {m for m, _ in cols} <= set(M.REPORT_METRICS)
    assert {s for _, s in cols} == set(STATS)
    ok = df[df["n"] > 0]
    assert sorted(ok["lora.r"]) == [4, 8] and set(ok["lora.target_modules"]) == {"qv"}
    for _, row in ok.iterrows():
        dirs = row["run_dirs"].split(";")
        assert len(dirs) == row["n"] == 2
        values = [read_metrics(Path(d))[M.VAL_LOSS] for d in dirs]
        assert row[f"{M.VAL_LOSS}:mean"] == pytest.approx(statistics.mean(values))
        assert row[f"{M.VAL_LOSS}:std"] == pytest.approx(statistics.stdev(values))
        half = stats.t.ppf(0.975, 1) * statistics.stdev(values) / math.sqrt(2)
        assert row[f"{M.VAL_LOSS}:ci95_hi"] == pytest.approx(statistics.mean(values) + half)
        params = {read_metrics(Path(d))[M.TRAINABLE_PARAMS] for d in dirs}
        assert row[f"{M.TRAINABLE_PARAMS}:mean"] == params.pop()
    bad = df[df["n"] == 0]
    assert list(bad["n_failed"]) == [2, 2]
    # failed runs are listed, not dropped
    md = (out / "report.md").read_text()
    for d, r in _runs(sweep).items():
        if r[M.STATUS] == M.STATUS_FAILED:
            assert str(d) in md
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 8 and (runs["status"] == M.STATUS_FAILED).sum() == 4
    tex = (out / "results.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textbf{" in tex and r"$\pm$" in tex
    html = (out / "report.html").read_text()
    # four plots always; metric vs FLOPs too when the runs record compute
    assert html.count("data:image/png;base64,") == len(list(out.glob("*.png"))) >= 4 and "src='http" not in html
    for png in ("loss_vs_rank.png", "rank_alpha_heatmap.png", "loss_curves.png", "metric_vs_params.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_out_of_memory_in_a_sweep_point_is_recorded_as_failed(tmp_path, monkeypatch):
    """An exception that is not a config error (here a CUDA OOM) fails the point, in metrics.json and W&B."""
    import torch
    import wandb

    from lora_exp.training import recipe
    from lora_exp.training import run as training

    def out_of_memory(*args, **kwargs):
        wandb.init(mode="offline", dir=str(tmp_path), project="t")  # the point's W&B run had started
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "_is_multirun", lambda: True)
    monkeypatch.setattr(recipe.Recipe, "train", out_of_memory)
    cfg = compose("model=tiny_llama", run_dir=tmp_path / "point")
    assert training.run_cli(cfg) is None  # the sweeper moves on
    record = read_metrics(tmp_path / "point")
    assert record[M.STATUS] == M.STATUS_FAILED and "OutOfMemoryError" in record[M.ERROR]
    assert wandb.run is None
    (data,) = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert b"failed" in data.read_bytes()  # the W&B run's summary status


def test_named_sweep_runs_from_any_directory(tmp_path):
    """The named sweeps ship inside the package (``hparams_search``): no checkout, no ``-cd`` needed."""
    tiny = ("model=tiny_llama", "debug=quick", "logger=none", "trainer.max_steps=2", "data.num_train=16")
    # the seeds sweep, narrowed to one point: its sweep directory, its seed, a completed run
    run_cli("lora_exp.train", "-m", "hparams_search=seeds", "hydra.sweeper.params.seed=3", *tiny, cwd=tmp_path)
    (point,) = list(tmp_path.glob("outputs/sweeps/seeds/*/0"))
    assert read_metrics(point)[M.STATUS] == M.STATUS_COMPLETED
    assert "seed=3" in (point / ".hydra" / "overrides.yaml").read_text()
