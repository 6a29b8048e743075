"""Experiment loggers: Weights & Biases (online when logged in, else offline), CSV."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


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


def wandb_logger(save_dir: str, project: str, mode: str | None = None, **kwargs):
    """A Lightning ``WandbLogger`` that never needs the network unless the user is logged in.

    ``mode`` null means: ``$WANDB_MODE`` if set, else online when logged in, else offline.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    if mode == "offline":
        log.info(
            "W&B offline: the run is saved under %s/wandb; upload it later with `wandb sync %s/wandb/offline-run-*`",
            save_dir,
            save_dir,
        )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, mode=mode, **kwargs)


def finish_wandb() -> None:
    """End the current W&B run, so the next job of a multirun never logs into it."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
