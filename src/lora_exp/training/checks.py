"""The keys the training recipe reads (``trainer.*``, ``optim.*``, ``loss``, ``speed``, ``checkpoint``,
``resume``, ``seed``), declared for ``lora_exp.config.validate``."""

from __future__ import annotations

from lora_exp.config.schema import Check, run_checks
from lora_exp.training import full
from lora_exp.training.loss import LOSSES
from lora_exp.training.selection import SELECT

# Lightning's precision names ("auto": follows the hardware, see model/precision.py)
PRECISIONS = (
    "auto",
    "32-true",
    "32",
    32,
    "16-mixed",
    "bf16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
)

RUN_CHECKS = (
    Check("seed", "int", low=0),
    # lora: train a LoRA adapter (the lora group); full: every weight (training/full.py)
    Check("method", "choice", choices=full.METHODS, default="lora"),
    Check("resume", "bool", default=False),
    Check("checkpoint.every_n_steps", "int", low=1, optional=True),
    Check("checkpoint.select", "choice", choices=SELECT, default="last"),
    Check("speed.*", "bool"),
    # "auto": liger on CUDA when installed, else chunked (model/precision.py)
    Check("loss.impl", "choice", choices=("auto", *LOSSES), default="chunked"),
)

TRAINER_CHECKS = (
    Check("trainer.max_steps", "int", low=-1, optional=True),
    Check("trainer.max_epochs", "int", low=-1, optional=True),
    Check("trainer.accumulate_grad_batches", "int", low=1, optional=True),
    Check("trainer.devices", "int", low=1, optional=True, text_ok=True),  # also "auto", "0,1", [0, 1]
    Check("trainer.precision", "choice", choices=PRECISIONS, optional=True),
    Check("trainer.early_stopping.patience", "int", low=1, optional=True),
)

# read by LoraModule.configure_optimizers and loraplus_optimizer (training/module.py)
OPTIM_CHECKS = (
    Check("optim.lr", "number", low=0, low_open=True),
    Check("optim.weight_decay", "number", low=0),
    Check("optim.warmup_ratio", "number", low=0, high=1, optional=True),
    Check("optim.warmup_steps", "int", low=0, optional=True),
    Check("optim.loraplus_lr_ratio", "number", low=1, optional=True),
)


def check(cfg, problems: list[str]) -> None:
    """Append every problem with the training keys to ``problems``; DeepSpeed must be installed to be chosen."""
    import importlib.util

    from omegaconf import OmegaConf

    run_checks(cfg, (*RUN_CHECKS, *TRAINER_CHECKS, *OPTIM_CHECKS), problems)
    full.check(cfg, problems)  # method=full with keys it cannot honour (quant, LoRA+, lora.*)
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    if isinstance(strategy, str) and strategy.startswith("deepspeed") and not importlib.util.find_spec("deepspeed"):
        problems.append(f"trainer.strategy={strategy} needs DeepSpeed: pip install deepspeed (CUDA GPUs)")
