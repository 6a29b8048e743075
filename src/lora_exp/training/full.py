"""Full fine-tuning (``method=full``): every weight trained, in the same harness as LoRA.

The same data, loss, metrics, logging, checkpoints and run directory as a LoRA run; what differs
is the model (the plain causal LM, every parameter ``requires_grad``), its precision (fp32 master
weights, see ``lora_exp.model.precision``) and what is saved: ``RUN/model/``, a plain HF folder
(``from_pretrained`` loads it) with the tokenizer, in place of ``RUN/adapter/``. Checkpoints keep
the ``requires_grad`` parameters (``LoraModule.on_save_checkpoint``), here every weight.
"""

from __future__ import annotations

from pathlib import Path

METHODS = ("lora", "full")
FULL = "full"
# PEFT-only settings that full fine-tuning cannot honour: refused rather than silently ignored
_LORA_ONLY = {
    "optim.loraplus_lr_ratio": "LoRA+ sets the rates of LoRA's A and B matrices",
    "optim.loraplus_lr_embedding": "LoRA+ sets the rates of LoRA's A and B matrices",
}


def method(cfg) -> str:
    """The run's ``method`` (``lora`` when the key is absent, as in configs saved before it existed)."""
    return str(cfg.get("method") or "lora")


def is_full(cfg) -> bool:
    return method(cfg) == FULL


def check(cfg, problems: list[str]) -> None:
    """Problems of ``method=full`` with keys it cannot honour: a quantized base, Unsloth, LoRA-only keys.

    ``lora.*`` keys typed on the command line of a single run are refused too (they would change
    nothing); in a multirun they are allowed, so one grid may cross ``method=lora,full`` with LoRA keys.
    """
    from omegaconf import OmegaConf

    from lora_exp.model import quant

    if not is_full(cfg):
        return
    mode = quant.mode(cfg)
    if mode != "none":
        problems.append(
            f"method=full with quant={mode}: full fine-tuning trains every weight, and quantized "
            "weights cannot be trained; use quant=none (or method=lora for QLoRA)"
        )
    if (cfg.get("model") or {}).get("backend", "hf") == "unsloth":
        problems.append(
            "method=full with model.backend=unsloth: Unsloth trains LoRA adapters only; use model.backend=hf"
        )
    for key, why in _LORA_ONLY.items():
        if OmegaConf.select(cfg, key) is not None:
            problems.append(f"method=full with {key}: {why}, and a full fine-tune has none; remove {key}")
    typed = _typed_lora_keys()
    if typed:
        problems.append(
            f"method=full ignores the LoRA settings {', '.join(typed)}: remove them (full fine-tuning has no adapter)"
        )


def _typed_lora_keys() -> list[str]:
    """``lora.*`` keys (or ``lora=OPTION``) typed on a single run's command line; none in a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return []
    if not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.MULTIRUN:
        return []
    keys = [o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task]
    return [k for k in keys if k == "lora" or k.startswith("lora.")]


def train_every_weight(model) -> None:
    """Make every parameter trainable (``from_pretrained`` leaves them so; this states it)."""
    for p in model.parameters():
        p.requires_grad_(True)


def param_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of a plain model, tied weights counted once (as PEFT counts)."""
    params = list(model.parameters())  # parameters() yields a tied weight once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_params_line(model) -> str:
    """The same line PEFT prints for an adapter, for the whole model."""
    trainable, total = param_counts(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def save_model_atomically(model, tokenizer, run, state_dict=None) -> None:
    """Save the trained model and its tokenizer to ``run.model`` through a temporary folder.

    A full disk never leaves half a model: the previous folder stays until the new one is complete.
    ``state_dict`` passes a gathered state (FSDP).
    """
    from lora_exp.runs.outputs import write_dir_atomically

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(str(tmp))

    use_cache = model.config.use_cache
    model.config.use_cache = True  # off for training only; generation from the saved folder wants the KV cache
    try:
        write_dir_atomically(run.model, write)
    finally:
        model.config.use_cache = use_cache


def model_sha256(folder: Path) -> str | None:
    """SHA-256 over the saved weight files (``*.safetensors`` in name order); None when there are none."""
    import hashlib

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
