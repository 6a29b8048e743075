"""``resume=true`` against the overrides a run was started with: what may change, what may not.

A resumed run continues from its checkpoint, so every override must be the one it started with,
or the checkpoint would silently continue another experiment. The training length is the
exception: ``trainer.max_steps`` / ``trainer.max_epochs`` may grow, and a completed run then
trains on from its last checkpoint (optimizer, scheduler, RNG and data position included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_exp import metrics as M
from lora_exp.errors import RunDirError

# the only overrides a resumed run may change: how long it trains
EXTENDABLE = ("trainer.max_steps", "trainer.max_epochs")


def by_key(overrides: list[str]) -> dict[str, str]:
    """``["lora.r=8", "+x=1", "~y"]`` -> ``{"lora.r": "lora.r=8", "x": "+x=1", "y": "~y"}``."""
    return {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}


def changed_keys(recorded: list[str], now: list[str]) -> list[str]:
    """Keys whose override was added, removed or given another value, sorted."""
    before, after = by_key(recorded), by_key(now)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def check_resume(record: dict[str, Any], recorded: list[str], now: list[str], run_dir: Path, cfg) -> dict[str, Any]:
    """The previous ``record`` to resume from, given the run's ``recorded`` overrides and this command's.

    Raises:
        RunDirError: an override other than ``trainer.max_steps`` / ``trainer.max_epochs`` differs;
            the message names each one, with both values.

    A completed run whose training length was raised is returned as interrupted, so training goes
    on from its last checkpoint; one that already reached the new ``trainer.max_steps`` stays
    completed (nothing to do).
    """
    changed = changed_keys(recorded, now)
    refused = [k for k in changed if k not in EXTENDABLE]
    if refused:
        before, after = by_key(recorded), by_key(now)
        diffs = "; ".join(f"{k} (run: {before.get(k, 'not set')}, now: {after.get(k, 'not set')})" for k in refused)
        raise RunDirError(
            f"resume=true in {run_dir}, but the overrides differ from the run's: {diffs}. "
            f"Only {' and '.join(EXTENDABLE)} may change on resume (to train for longer)"
        )
    if not changed or record.get(M.STATUS) != M.STATUS_COMPLETED:
        return record
    from omegaconf import OmegaConf

    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if "trainer.max_epochs" not in changed and max_steps not in (None, -1) and max_steps <= record.get(M.STEPS, 0):
        return record
    return {**record, M.STATUS: M.STATUS_INTERRUPTED}
