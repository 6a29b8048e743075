"""Shared fixtures: the real config composed once, subprocess runs of the public CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tests never touch the network.
OFFLINE_ENV = {
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_SILENT": "true",
}
os.environ.update(OFFLINE_ENV)


def run_cli(
    module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 900, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args...`` as a user would, from ``cwd``; return the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def train_cli(run_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -m lora_exp.train overrides... hydra.run.dir=run_dir`` from a directory outside the repo."""
    cwd = kwargs.pop("cwd", run_dir.parent)
    return run_cli("lora_exp.train", *overrides, f"hydra.run.dir={run_dir}", cwd=cwd, **kwargs)


# One optimizer step that is the gradient itself (fp32, SGD, no warm-up, no clipping, no dropout):
# two runs that must take the same step give the same adapter bytes up to float rounding.
ONE_SGD_STEP = (
    "lora.dropout=0.0",
    "trainer.precision=32-true",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "trainer.gradient_clip_val=null",
    "optim.warmup_ratio=0",
    "optim.lr=0.5",
    "optim.optimizer._target_=torch.optim.SGD",
    "~optim.optimizer.betas",
    "~optim.optimizer.eps",
    "logger=none",
)


def compose(*overrides: str, run_dir: Path | str = "/tmp/lora-exp-unused"):
    """Compose the real ``train`` config with overrides, as the CLI would (without Hydra's runtime)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, f"paths.run_dir={run_dir}"])


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """A short but complete run of the default model (SmolLM2-135M) through the public CLI."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    train_cli(
        run_dir, "trainer.max_steps=8", "data.num_train=64", "data.num_val=32", "logger=csv", "optim.warmup_steps=1"
    )
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A few steps of the random tiny Llama, logged to offline W&B."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    train_cli(run_dir, "model=tiny_llama", "debug=quick", "logger=wandb")
    return run_dir


@pytest.fixture(scope="module")
def tiny_peft():
    """The tiny random Llama with a non-zero LoRA adapter on q,k,v,o (dropout off), for parity tests."""
    import torch

    from lora_exp.model import lora
    from lora_exp.model.load import load_base_model, resolve_model_folder

    cfg = compose("model=tiny_llama", "lora.dropout=0.0")
    torch.manual_seed(0)
    model = lora.wrap(load_base_model(cfg.model, resolve_model_folder(cfg.model)), cfg.lora)
    for n, p in model.named_parameters():  # a non-zero adapter, so the LoRA path matters
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()
