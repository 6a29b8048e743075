"""The SLURM launcher's local twin runs a two-point sweep: each point in its own process and run dir."""

from __future__ import annotations

from conftest import run_cli
from lora_exp import metrics as M
from lora_exp.runs.rundir import read_metrics


def test_submitit_local_launcher_runs_a_two_point_sweep(tmp_path):
    sweep_dir = tmp_path / "multirun"
    run_cli(
        "lora_exp.train",
        "-m",
        "hydra/launcher=local",
        "model=tiny_llama",
        "debug=quick",
        "logger=none",
        "trainer.max_steps=2",
        "data.num_train=16",
        "data.num_val=8",
        "lora.r=4,8",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    records = [read_metrics(sweep_dir / str(i)) for i in (0, 1)]
    assert [r[M.STATUS] for r in records] == [M.STATUS_COMPLETED] * 2
    assert records[0][M.TRAINABLE_PARAMS] * 2 == records[1][M.TRAINABLE_PARAMS]  # r=4 vs r=8
    assert (sweep_dir / ".submitit").is_dir()  # submitit ran the jobs
    for i in (0, 1):
        assert (sweep_dir / str(i) / "adapter" / "adapter_config.json").is_file()
