"""Quantized base models through bitsandbytes: QLoRA (NF4) and 8-bit (LLM.int8()).

The ``quant`` config group names the mode and carries ``BitsAndBytesConfig`` arguments verbatim
(``quant.bnb``), so every bitsandbytes option is one override away.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from lora_exp.errors import ModelAccessError

MODES = ("none", "nf4", "int8")
INSTALL = "pip install 'lora-exp[qlora]'  (bitsandbytes)"


def mode(cfg) -> str:
    """The quantization mode of a composed config: ``none`` when the group is absent."""
    quant = cfg.get("quant")
    return "none" if not quant else str(quant.get("mode", "none"))


def check(cfg, problems: list[str]) -> None:
    """Add every problem with the ``quant`` group to ``problems`` (no weights are touched)."""
    m = mode(cfg)
    if m not in MODES:
        problems.append(f"quant.mode={m!r}: expected one of {list(MODES)}")
        return
    if m != "none" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"quant={m} needs bitsandbytes: {INSTALL}")
    if m != "none" and cfg.model.get("backend", "hf") != "hf":
        return  # Unsloth quantizes on its own; see models.load_unsloth
    if m == "nf4" and cfg.quant.bnb.get("bnb_4bit_compute_dtype") not in (
        None,
        "auto",
        "bfloat16",
        "float16",
        "float32",
    ):
        problems.append(
            f"quant.bnb.bnb_4bit_compute_dtype={cfg.quant.bnb.bnb_4bit_compute_dtype!r}: "
            "expected auto, bfloat16, float16 or float32"
        )


def bnb_config(quant_cfg, fsdp: bool = False, model_dtype: str | None = None):
    """``BitsAndBytesConfig`` for ``quant_cfg``, or None when the model is not quantized.

    Under FSDP the 4-bit weights must be stored in the dtype of the unquantized parameters, so
    FSDP can flatten them together (QLoRA + FSDP, bitsandbytes >= 0.43).
    """
    if not quant_cfg or quant_cfg.get("mode", "none") == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelAccessError(f"quant={quant_cfg.mode} needs bitsandbytes: {INSTALL}")
    from omegaconf import OmegaConf
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = OmegaConf.to_container(quant_cfg.bnb, resolve=True)
    if kwargs.get("bnb_4bit_compute_dtype") == "auto":  # a config not resolved by the run: this device's choice
        from lora_exp.model.precision import resolve_dtype

        kwargs["bnb_4bit_compute_dtype"] = resolve_dtype("auto")
    if fsdp and kwargs.get("load_in_4bit") and model_dtype:
        kwargs["bnb_4bit_quant_storage"] = model_dtype
    return BitsAndBytesConfig(**kwargs)


def device_map() -> dict[str, Any]:
    """Where bitsandbytes quantizes: this process's GPU, else the CPU.

    A device map is required even on the CPU: without one, transformers leaves the weights
    unquantized and PEFT fails later on them.
    """
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def prepare(model, gradient_checkpointing: bool):
    """PEFT's k-bit preparation: freeze the base, norms and non-quantized weights in fp32.

    Gradient checkpointing uses the non-reentrant implementation, which needs no input that
    requires grad and works with the frozen embeddings.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
