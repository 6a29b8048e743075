"""Weights & Biases logging: online when logged in, else offline (the run history is ``training.history``).

W&B is never allowed to fail a run: when the server cannot be reached the run is logged offline
inside the run directory instead, and anything that goes wrong while logging at the end of a run
is a warning. In a Hydra multirun every job gets its own W&B run, all in one group named after
the sweep, with the job's overrides as config and tags.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lora_exp import metrics as M

log = logging.getLogger(__name__)

WANDB_TAG_MAX = 64  # W&B rejects longer tags


def wandb_logged_in() -> bool:
    """True when a W&B API key is available (``WANDB_API_KEY`` or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].rstrip("/")
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def sweep_context() -> dict[str, Any] | None:
    """The Hydra multirun this job belongs to: group name, job number and the job's overrides.

    None outside a multirun. The group is named after the sweep directory's last two parts
    (``sweeps/rank_alpha/2025-01-01_12-00-00`` -> ``rank_alpha-2025-01-01_12-00-00``), so every
    job of one sweep shares it and two sweeps never do.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir)
    overrides = {}
    for item in hc.overrides.task:
        key, _, value = item.partition("=")
        overrides[key.lstrip("+~")] = value
    swept = _swept_keys(hc)
    return {
        "group": f"{sweep_dir.parent.name}-{sweep_dir.name}",
        "dir": str(sweep_dir),
        "job_num": hc.job.num,
        "overrides": overrides,
        # the values this job's point takes on the swept keys (all overrides when those are unknown)
        "swept": {k: v for k, v in overrides.items() if k in swept} or overrides,
    }


def _swept_keys(hc) -> set[str]:
    """Keys the sweep varies: sweep-syntax overrides (``lora.r=4,8``) and ``hydra.sweeper.params``.

    A job only sees its own expanded overrides; the sweep's raw ones are in ``<sweep dir>/multirun.yaml``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    keys: set[str] = set()
    params = OmegaConf.select(hc, "sweeper.params", default=None)
    if params:
        keys |= {str(k) for k in params}
    try:
        raw = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml").hydra.overrides.task
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(list(raw)) if o.is_sweep_override()}
    except Exception:  # no multirun.yaml (another launcher): the sweeper params are all we know
        pass
    return {k.lstrip("+~") for k in keys}


def wandb_logger(
    save_dir: str,
    project: str,
    mode: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    name: str | None = None,
    entity: str | None = None,
    log_model: bool = False,
    num_samples: int = 4,
    max_new_tokens: int = 64,
    init_timeout_s: float = 60,
    run_id: str | None = None,
):
    """A Lightning ``WandbLogger`` that never needs the network unless the user is logged in.

    Args:
        save_dir: the run directory; W&B writes ``save_dir/wandb/``.
        project: W&B project.
        mode: ``online``, ``offline``, ``disabled`` or null: ``$WANDB_MODE`` if set, else online
            when logged in, else offline.
        group: W&B group; null in a multirun means the sweep's name (see ``sweep_context``).
        tags: tags; a multirun job adds its overrides (``lora.r=8``).
        name: W&B run name; null in a multirun means the job's overrides.
        entity: W&B entity (user or team); null for the default.
        log_model: Lightning's checkpoint upload; the adapter is logged as an artifact anyway.
        num_samples: held-out prompts generated at the end of training, logged as a table (0: none).
        max_new_tokens: length limit of those generations.
        init_timeout_s: how long to wait for the W&B server before falling back to offline.
        run_id: continue this W&B run (``resume=true`` passes the id the run directory recorded).
    """
    from omegaconf import OmegaConf

    if rank_zero_only.rank != 0:
        # DDP/FSDP ranks > 0: Lightning logs from rank 0 only, and a W&B run here would be a second, empty one
        return LoraWandbLogger(save_dir=save_dir, project=project, log_model=log_model, offline=True)
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    if OmegaConf.is_config(tags):
        tags = OmegaConf.to_container(tags, resolve=True)
    tags = [str(t) for t in (tags or [])]
    sweep = sweep_context()
    config: dict[str, Any] = {}
    if sweep:
        group = group or sweep["group"]
        name = name or ",".join(f"{k}={v}" for k, v in sweep["swept"].items()) or None
        tags += [f"{k}={v}"[:WANDB_TAG_MAX] for k, v in sweep["swept"].items()]
        config["sweep"] = sweep
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = init_run(
        mode,
        init_timeout_s,
        project=project,
        entity=entity,
        group=group,
        name=name,
        tags=list(dict.fromkeys(tags)),
        dir=save_dir,
        config=config,
        **({"id": run_id} if run_id else {}),
    )
    logger = LoraWandbLogger(
        experiment=run, save_dir=save_dir, project=project, log_model=log_model, offline=run.offline
    )
    logger.num_samples = num_samples
    logger.max_new_tokens = max_new_tokens
    return logger


def _server_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the W&B server cannot be reached (refused, no route, no DNS), or None; seconds, not wandb's minute."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"
    return None


def init_run(mode: str, timeout_s: float, **kwargs):
    """``wandb.init``; an online run that cannot reach the server falls back to offline."""
    import wandb

    if mode == "online" and (problem := _server_unreachable()):
        log.warning("W&B server unreachable (%s); logging offline instead", problem)
        mode = "offline"
    if mode == "online":
        try:
            resume = {"resume": "allow"} if kwargs.get("id") else {}
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout_s), **resume, **kwargs)
        except Exception as e:  # no network, bad key, server down: the run goes on offline
            log.warning("W&B unreachable (%s: %s); logging offline instead", type(e).__name__, e)
            finish_wandb()
            mode = "offline"
    run = wandb.init(mode=mode, **kwargs)
    if mode == "offline":
        log.info("W&B offline: upload this run later with `wandb sync %s`", run.dir.rsplit("/files", 1)[0])
    return run


class LoraWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` plus the end-of-run record: summary, adapter artifact, samples.

    Attributes:
        num_samples: held-out prompts to generate at the end of training (see ``SampleGenerations``).
        max_new_tokens: length limit of those generations.
    """

    num_samples: int = 0
    max_new_tokens: int = 64

    def log_run_end(self, record: dict[str, Any], adapter_dir: Path | None, samples: list[dict] | None) -> None:
        """Summary (final and best values, status), the adapter as a ``model`` artifact, the samples table.

        Never raises: the run's results are already on disk, W&B trouble is only a warning.
        """
        run = self.experiment
        for what, step in (
            ("summary", lambda: run.summary.update(summary_values(record))),
            ("samples", lambda: samples and run.log({"samples": samples_table(samples)})),
            ("adapter", lambda: adapter_dir and _log_adapter(run, adapter_dir, record)),
        ):
            try:
                step()
            except Exception as e:  # W&B must never fail a finished run
                log.warning("W&B: could not log the %s: %s: %s", what, type(e).__name__, e)


def _log_adapter(run, adapter_dir: Path, record: dict[str, Any]) -> None:
    import wandb

    metadata = {k: v for k, v in record.items() if isinstance(v, (int, float, str, list)) and not isinstance(v, bool)}
    artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata=metadata)
    artifact.add_dir(str(adapter_dir))
    run.log_artifact(artifact)


def summary_values(record: dict[str, Any]) -> dict[str, Any]:
    """What a run's W&B summary holds: every number and string of the run record (final and best values)."""
    return {
        k: v
        for k, v in record.items()
        if isinstance(v, (str, bool)) or (isinstance(v, (int, float)) and math.isfinite(v))
    }


def samples_table(samples: list[dict]):
    """A ``wandb.Table`` of held-out generations: prompt, reference, generation, exact match."""
    import wandb

    columns = ["prompt", "reference", "generation", "exact_match"]
    return wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])


def wandb_loggers(loggers) -> list[LoraWandbLogger]:
    return [lg for lg in loggers if isinstance(lg, LoraWandbLogger)]


def wandb_record(loggers) -> dict[str, Any]:
    """Where the run's W&B run lives, for metrics.json (and so for the report)."""
    for lg in wandb_loggers(loggers):
        run = lg.experiment
        return {
            M.WANDB_RUN_ID: run.id,
            M.WANDB_GROUP: run.group or None,
            M.WANDB_PROJECT: run.project,
            M.WANDB_MODE: "offline" if run.offline else "online",
        }
    return {}


def finish_wandb(exit_code: int | None = None) -> None:
    """End the current W&B run, so the next job of a multirun never logs into it.

    A non-zero ``exit_code`` marks the W&B run as failed.
    """
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            try:
                if exit_code:
                    wandb.run.summary[M.STATUS] = M.STATUS_FAILED
                wandb.finish(exit_code=exit_code)
            except Exception as e:  # never let W&B turn a result into a crash
                log.warning("W&B: finish failed: %s: %s", type(e).__name__, e)
