"""W&B never fails a run: an unreachable server means an offline run in the run directory."""

from __future__ import annotations

import pytest


def test_unreachable_wandb_server_falls_back_to_offline(tmp_path, monkeypatch):
    from lora_exp.training.loggers import finish_wandb, wandb_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # "logged in" ...
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # ... to a server nobody answers for
    try:
        logger = wandb_logger(str(tmp_path), "lora-exp-test", init_timeout_s=1)
        assert logger.experiment.offline
        logger.experiment.log({"train/loss": 1.0})
    finally:
        finish_wandb()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("values", [[1.0], [1.0, 2.0, 4.0]])
def test_report_aggregate_matches_scipy(values):
    import math
    import statistics

    from scipy import stats

    from lora_exp.reporting.report import aggregate

    a = aggregate(values)
    assert a["n"] == len(values) and a["mean"] == pytest.approx(statistics.mean(values))
    if len(values) == 1:
        assert math.isnan(a["std"]) and math.isnan(a["ci95_lo"])
    else:
        lo, hi = stats.t.interval(0.95, len(values) - 1, loc=statistics.mean(values), scale=stats.sem(values))
        assert (a["ci95_lo"], a["ci95_hi"]) == (pytest.approx(lo), pytest.approx(hi))
