"""LoRA configuration and wrapping through PEFT."""

from __future__ import annotations

import math
from typing import Any

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS: dict[str, list[str]] = {
    "qv": ["q_proj", "v_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj"],
    "qkvo": ATTENTION,
    "mlp": MLP,
    "all_linear": ATTENTION + MLP,
}


def resolve_target_modules(value: Any) -> list[str]:
    """Turn ``lora.target_modules`` (a preset name, a comma-separated string or a list) into a list."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        if value in TARGET_PRESETS:
            return list(TARGET_PRESETS[value])
        value = [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def lora_scaling(lora_cfg) -> float:
    """The factor PEFT multiplies the LoRA update by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    r = lora_cfg.r
    return lora_cfg.alpha / (math.sqrt(r) if lora_cfg.get("use_rslora") else r)


def peft_config(lora_cfg):
    """Build PEFT's ``LoraConfig`` from the ``lora`` config group, with plain Python containers."""
    from omegaconf import OmegaConf
    from peft import LoraConfig

    init = lora_cfg.get("init", "default")
    modules_to_save = lora_cfg.get("modules_to_save")
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=int(lora_cfg.r),
        lora_alpha=float(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=resolve_target_modules(lora_cfg.target_modules),
        bias=lora_cfg.get("bias", "none"),
        use_rslora=bool(lora_cfg.get("use_rslora", False)),
        use_dora=bool(lora_cfg.get("use_dora", False)),
        init_lora_weights=True if init in (None, "default") else init,
        modules_to_save=OmegaConf.to_container(modules_to_save)
        if OmegaConf.is_config(modules_to_save)
        else modules_to_save,
    )


def wrap(model, lora_cfg):
    """Wrap ``model`` with LoRA adapters; only adapter parameters are left trainable.

    The global RNG must be seeded before this call: PEFT draws the LoRA A matrices from it.
    """
    from peft import get_peft_model

    targets = set(resolve_target_modules(lora_cfg.target_modules))
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(targets - present)
    if missing:
        from lora_exp.errors import ConfigError

        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if type(m).__name__ == "Linear" or hasattr(m, "weight") and getattr(m.weight, "ndim", 0) == 2
            }
        )
        raise ConfigError([f"lora.target_modules: {missing} not found in the model; its linear modules are {linear}"])
    return get_peft_model(model, peft_config(lora_cfg))


def param_counts(peft_model) -> tuple[int, int]:
    """(trainable, total) parameters exactly as PEFT counts and prints them."""
    return peft_model.get_nb_trainable_parameters()


def trainable_params_line(peft_model) -> str:
    """PEFT's own ``print_trainable_parameters`` line."""
    trainable, total = param_counts(peft_model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def mutates_base(lora_cfg) -> bool:
    """PiSSA and OLoRA initialise the adapter from the base weights and subtract it from them.

    Such an adapter only fits the modified base it was trained on, until it is converted back
    into a plain LoRA adapter of the original base (see :func:`save_adapter`).
    """
    init = str(lora_cfg.get("init") or "default")
    return init.startswith("pissa") or init == "olora"


def save_initial_adapter(peft_model, path) -> None:
    """Save the adapter as initialised, before any training: the reference for :func:`save_adapter`.

    Its config is saved as a plain LoRA init (as PEFT's PiSSA docs ask), so loading it never
    repeats the decomposition.
    """
    config = peft_model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft_model.save_pretrained(str(path))
    finally:
        config.init_lora_weights = init


def save_adapter(peft_model, path, initial_path=None, state_dict=None) -> None:
    """Save the trained adapter so plain PEFT loads it on the original, unmodified base model.

    With an ``initial_path`` (PiSSA / OLoRA), PEFT converts the adapter into an ordinary LoRA
    adapter of rank ``2 r`` whose update equals the trained one minus the initial one
    (``path_initial_model_for_weight_conversion``). ``state_dict`` passes a gathered state (FSDP).
    """
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    if initial_path is not None:
        kwargs["path_initial_model_for_weight_conversion"] = str(initial_path)
    peft_model.save_pretrained(str(path), **kwargs)
