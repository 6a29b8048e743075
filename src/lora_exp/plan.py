"""``python -m lora_exp.plan [overrides]``: what a run (or, with ``-m``, each sweep point) will cost.

It composes the same config as ``lora_exp.train``, so every train override and sweep works here,
builds the model on the meta device (no weights, no network) and prints PEFT's trainable-params
line, the adapter's size on disk, tokens per step and the estimated peak training memory. With
``-m`` a final table has one row per sweep point and flags those that exceed ``plan.gpu_mem_gb``.
It writes nothing: Hydra's output folders go to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import hydra
from omegaconf import DictConfig

from lora_exp import cli
from lora_exp.config import config_dir

# Filled by each job; Hydra's basic launcher runs a sweep's jobs one after another in this process.
PLANS: list = []
FAILED: list[tuple[str, str]] = []
_MULTIRUN = {"seen": False}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lora_exp.config.validate import validate
    from lora_exp.errors import UserError
    from lora_exp.planning.planner import format_plan, make_plan

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    _MULTIRUN["seen"] |= multirun
    label = " ".join(hydra_cfg.overrides.task)
    try:
        validate(cfg)
        plan = make_plan(cfg, label)
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not multirun:
            cli.fail("plan", e)
        print(f"lora_exp.plan: error: {e}", file=sys.stderr, flush=True)
        FAILED.append((label, str(e).splitlines()[0]))
        return
    PLANS.append(plan)
    print(format_plan(plan, cfg), flush=True)


def run() -> None:
    """Run the Hydra app with its output folders in a temporary directory, then print the sweep table."""
    from lora_exp.planning.planner import format_table

    tmp = tempfile.mkdtemp(prefix="lora-exp-plan-")
    args = sys.argv[1:]
    extra = []
    for key, value in (
        ("hydra.run.dir", f"{tmp}/run"),
        ("hydra.sweep.dir", f"{tmp}/sweep"),
        ("hydra.output_subdir", "null"),
    ):
        if not any(a.startswith(f"{key}=") for a in args):
            extra.append(f"{key}={value}")
    sys.argv = [sys.argv[0], *cli.hydra_help("plan", __doc__, args), *extra]
    try:
        main()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if _MULTIRUN["seen"]:
        print()
        print(format_table(PLANS))
        for label, error in FAILED:
            print(f"failed: {label or '(defaults)'}: {error}")
        if FAILED:
            sys.exit(2)


if __name__ == "__main__":
    run()
