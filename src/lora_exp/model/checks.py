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
