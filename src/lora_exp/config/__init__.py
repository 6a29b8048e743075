"""Hydra configs: where they live (``config_dir``), validation (``validate``) and resolvers."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The Hydra config folder: shipped inside the package, or the repository's ``conf/``."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"lora-exp configs not found next to {package}")
