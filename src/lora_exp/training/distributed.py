"""Multi-process runs (DDP, FSDP, DeepSpeed): one run directory, one adapter, one W&B run.

Lightning starts ranks 1..N-1 by re-running the command line. Inside a Hydra app it appends
``hydra.run.dir=<hydra.run.dir>``, which re-evaluates ``${now:...}`` and, in a multirun, points
at the wrong folder and re-launches the whole sweep (``-m`` is still on the command line).
:func:`children_share_run_dir` makes every rank re-compose exactly this job's config in this
job's output directory instead. Only global rank 0 writes ``metrics.json`` and the adapter;
Lightning's loggers already log from rank 0 only.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import OmegaConf

# hydra overrides a child must repeat; the rest (sweep, launcher, run dir, mode) are replaced
_KEPT_HYDRA_OVERRIDES = ("hydra.job.chdir", "hydra/job_logging", "hydra/hydra_logging", "hydra.verbose")


def is_global_zero() -> bool:
    """True in the process that writes the run's records (rank 0, or the only process).

    Valid before the Trainer exists: Lightning reads the rank from the launcher's environment
    (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``) when it is imported.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def trainer_kwargs(trainer_cfg) -> dict[str, Any]:
    """Lightning ``Trainer`` arguments from the ``trainer`` group; a ``strategy`` with ``_target_`` is built."""
    import hydra

    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    kwargs.pop("early_stopping", None)  # a callback (training/selection.py), not a Trainer argument
    strategy = kwargs.get("strategy")
    if isinstance(strategy, dict) and "_target_" in strategy:
        kwargs["strategy"] = hydra.utils.instantiate(trainer_cfg.strategy)
    return kwargs


def is_fsdp(trainer_cfg) -> bool:
    """Whether the run shards the model with FSDP (``trainer=fsdp`` or ``trainer.strategy=fsdp``)."""
    strategy = trainer_cfg.get("strategy")
    if OmegaConf.is_dict(strategy):
        return "FSDP" in str(strategy.get("_target_", ""))
    return isinstance(strategy, str) and strategy.startswith("fsdp")


def child_command(local_rank: int) -> tuple[list[str], str]:
    """The command line and working directory that start rank ``local_rank`` of this Hydra job.

    The child composes this job's overrides (not the sweep's) in RUN mode, with this job's
    output directory as its run directory and no ``.hydra/`` of its own.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    import __main__

    hc = HydraConfig.get()
    spec = getattr(__main__, "__spec__", None)
    if spec is not None:
        command = [sys.executable, "-m", spec.name]
    else:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    for source in hc.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            command.append(f"--config-dir={source.path}")
    command.append(f"--config-name={hc.job.config_name}")
    command += list(hc.overrides.task)
    command += [o for o in hc.overrides.hydra if o.startswith(_KEPT_HYDRA_OVERRIDES)]
    command += [
        f"hydra.run.dir={_quote(hc.runtime.output_dir)}",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def _quote(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def children_share_run_dir() -> None:
    """Make Lightning's script launcher start the other ranks with :func:`child_command`.

    Lightning calls the module-level ``_hydra_subprocess_cmd`` whenever Hydra is initialised;
    replacing it is the one hook it offers short of a custom strategy. Harmless outside Hydra
    and when a cluster (SLURM, torchrun) starts the processes itself.
    """
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as pytorch_launcher

    if HydraConfig.initialized():
        for launcher in (fabric_launcher, pytorch_launcher):  # each module holds its own reference
            launcher._hydra_subprocess_cmd = child_command


def sum_throughput(trainer, totals: dict[str, float]) -> dict[str, float]:
    """Token counts summed over all ranks; tokens/s is then the whole job's rate (rank 0's clock).

    Every rank must call this (it is a collective when there is more than one process).
    """
    if trainer.world_size <= 1:
        return totals
    import torch

    from lora_exp import metrics as M

    out = dict(totals)
    summed = (M.TRAIN_TOKENS, M.TRAIN_SUPERVISED_TOKENS, M.COMPUTE_TOKENS_REAL, M.COMPUTE_TOKENS_SUPERVISED)
    for key in (*summed, M.COMPUTE_TRAIN_FLOPS):
        if key not in totals:  # no FLOPs figure for this model: absent on every rank alike
            continue
        local = torch.tensor(float(totals[key]), dtype=torch.float64, device=trainer.strategy.root_device)
        out[key] = int(trainer.strategy.reduce(local, reduce_op="sum").item())
    seconds = totals[M.TRAIN_TIME_S]
    out[M.TRAIN_TOKENS_PER_S] = out[M.TRAIN_TOKENS] / seconds if seconds else 0.0
    return out
