"""Sweep helpers shared by the Hydra sweep configs in ``sweeps/``: config resolvers."""

from __future__ import annotations

from pathlib import Path


def sqlite_url(path: str) -> str:
    """``${sqlite_url:outputs/x.db}`` -> ``sqlite:////abs/outputs/x.db``, its folder created.

    Optuna's storage must exist before the first trial (SQLite creates the file, not its folder),
    and an absolute URL keeps pointing at the same study from any working directory.
    """
    p = Path(path).expanduser().resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p}"


def register_resolvers() -> None:
    """Make the resolvers above available to Hydra configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sqlite_url"):
        OmegaConf.register_new_resolver("sqlite_url", sqlite_url)
