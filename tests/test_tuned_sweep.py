"""``hydra/sweeper=tuned``: the learning rate tuned per configuration, then seeds at the chosen rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus

from conftest import run_cli
from hydra_plugins.lora_exp_tuned_sweeper.tuned_sweeper import TunedSweeper, best_lr, config_names

FAST = [
    "model=tiny_llama",
    "debug=quick",
    "logger=none",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "data.num_train=16",
    "data.num_val=8",
]


def test_a_tuned_grid_picks_each_configurations_best_rate_and_replicates_it(tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = ["hparams_search=tuned_grid", *FAST, "hydra.sweeper.lrs=[1e-5,3e-2]", "hydra.sweeper.seeds=[0,1]"]
    proc = run_cli("lora_exp.train", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    tuning = json.loads((sweep / "tuning.json").read_text())
    assert "tuned per configuration on val/loss" in tuning["protocol"]
    assert [c["name"] for c in tuning["configs"]] == ["lora.target_modules=qv", "lora.target_modules=all_linear"]
    for c in tuning["configs"]:
        scores = {}
        for lr in ("1e-05", "0.03"):  # the candidates' scores are their runs' own val/loss
            metrics = json.loads((sweep / c["name"] / f"lr={lr}" / "seed=0" / "metrics.json").read_text())
            scores[lr] = metrics["val/loss"]
        assert c["candidates"] == pytest.approx({"1e-05": scores["1e-05"], "0.03": scores["0.03"]})
        assert c["chosen_lr"] == float(min(scores, key=scores.get))
        assert len(c["runs"]) == 2
        for run in map(Path, c["runs"]):
            config = json.loads((run / "run.json").read_text())["config"]
            assert (
                config["optim"]["lr"] == c["chosen_lr"]
                and json.loads((run / "metrics.json").read_text())["status"] == "completed"
            )
    # 2 configurations x 2 rates at seed 0, then 1 more seed each at the chosen rate:
    # the seed-0 replicate is the search's own run, not trained twice
    assert proc.stdout.count("already completed") == 2
    # resumable like any sweep: the same command with resume=true trains nothing again
    again = run_cli("lora_exp.train", *args, f"hydra.sweep.dir={sweep}", "resume=true", cwd=tmp_path)
    assert again.stdout.count("already completed") == 8


def test_keys_the_sweeper_owns_are_refused(tmp_path: Path):
    proc = run_cli(
        "lora_exp.train",
        "hparams_search=tuned_grid",
        *FAST,
        "optim.lr=1e-3,1e-4",
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "optim.lr: set by hydra/sweeper=tuned" in proc.stderr


class _FakeLauncher:
    """Scores a job by |log10(lr) + 3| (best at 1e-3), minus its step budget / 1000; records what ran."""

    def __init__(self):
        self.jobs = []

    def launch(self, batch, initial_job_idx):
        out = []
        for job in batch:
            self.jobs.append(job)
            kv = dict(o.split("=", 1) for o in job)
            import math

            score = abs(math.log10(float(kv["optim.lr"])) + 3) - int(kv.get("trainer.max_steps", 0)) / 1000
            out.append(JobReturn(overrides=job, status=JobStatus.COMPLETED, _return_value=score))
        return out


def test_successive_halving_keeps_the_best_rates_for_longer_rungs():
    sweeper = TunedSweeper(lrs=[1e-5, 1e-4, 1e-3, 1e-2], seeds=[0], halving={"rungs": [10, 20], "eta": 2})
    sweeper.launcher, sweeper.job_idx = _FakeLauncher(), 0
    scores = sweeper._search({"name": "c", "overrides": []}, "val/loss")
    steps = [dict(o.split("=", 1) for o in job)["trainer.max_steps"] for job in sweeper.launcher.jobs]
    assert steps == ["10"] * 4 + ["20"] * 2  # half of the rates go on to the second rung
    assert best_lr(scores, "val/loss") == 1e-3
    assert best_lr({"0.1": 0.2, "0.2": 0.9}, "val/exact_match") == 0.2  # a metric to maximise
    assert best_lr({"0.1": None}, "val/loss") is None  # every candidate failed


def test_directory_names_hold_only_the_swept_keys():
    grid = [["lora.r=8", "model=tiny_llama", "lora.alpha=16"], ["lora.r=16", "model=tiny_llama", "lora.alpha=16"]]
    assert config_names(grid) == ["lora.r=8", "lora.r=16"]
    assert config_names([["model=tiny_llama"]]) == ["default"]
