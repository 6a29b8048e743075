"""The ``model.*`` and ``quant.*`` keys this subpackage reads, declared for ``lora_exp.config.validate``."""

from __future__ import annotations

from lora_exp.config.schema import Check, run_checks
from lora_exp.model.load import BACKENDS, DTYPES

# "auto": the dtype follows the hardware (bf16 where it is native, else fp32); see model/precision.py
DTYPE_CHOICES = ("auto", *sorted(DTYPES))

CHECKS = (
    Check("model.source", "choice", choices=("embedded", "random", "hub")),
    Check("model.dtype", "choice", choices=DTYPE_CHOICES),
    Check("model.path", "hf_folder", optional=True),
    Check("model.backend", "choice", choices=BACKENDS, default="hf"),
    Check("model.gradient_checkpointing", "bool", default=False),
    Check("model.compile", "bool", default=False),
)


def check(cfg, problems: list[str]) -> None:
    """Append every problem with the ``model`` and ``quant`` groups to ``problems`` (no weights are touched).

    Beyond the declared rows: the quantization mode and its bitsandbytes install (``quant.check``)
    and the Unsloth backend's GPU and install (``load.check_backend``), which look at the machine.
    """
    from lora_exp.model import quant
    from lora_exp.model.load import check_backend

    run_checks(cfg, CHECKS, problems)
    quant.check(cfg, problems)
    if cfg.model.get("backend", "hf") in BACKENDS:  # a bad name is already listed above
        check_backend(cfg.model, problems)


# Until model/lora.py declares its own ``check`` (issue 13 item 5 moves it there), the lora keys
# are declared here; ``lora_exp.config.validate`` prefers ``lora.check`` as soon as it exists.
LORA_CHECKS = (
    Check("lora.r", "int", low=1),
    Check("lora.alpha", "number", low=0, low_open=True),
    Check("lora.dropout", "number", low=0, high=1, high_open=True),
    Check(
        "lora.init",
        "choice",
        choices=("default", "gaussian", "pissa", "olora", "eva", None),
        prefixes=("pissa_niter_",),
        default="default",
    ),
)


def check_lora(cfg, problems: list[str]) -> None:
    """The ``lora`` rows above, and ``lora.target_modules`` as a preset or module names."""
    from lora_exp.model.lora import TARGET_PRESETS, resolve_target_modules

    run_checks(cfg, LORA_CHECKS, problems)
    try:
        targets = resolve_target_modules(cfg.lora.target_modules)
    except Exception as e:
        problems.append(f"lora.target_modules: {e}")
        return
    if not targets:
        problems.append("lora.target_modules is empty")
    bad = [t for t in targets if not t.replace("_", "").replace(".", "").isalnum()]
    if bad:
        problems.append(f"lora.target_modules={bad}: not module names; presets are {sorted(TARGET_PRESETS)}")
