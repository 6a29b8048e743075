"""Merging a run's adapter into its base and checking the merged folder's logits (``lora_exp.export`` says how)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

MERGED_DIR = "merged"
EXPORT_FILE = "lora_exp_export.json"


def export(cfg: DictConfig) -> dict[str, Any]:
    """Merge, save, reload and compare; return the record also saved as ``out/lora_exp_export.json``."""
    from lora_exp.errors import ConfigError, RunDirError
    from lora_exp.inference import session as inference
    from lora_exp.model.load import DTYPES
    from lora_exp.model.precision import resolve_dtype
    from lora_exp.runs.outputs import replace_dir, safe_output_dir

    dirs = inference.run_dirs(cfg.run_dir)
    if len(dirs) != 1:
        raise RunDirError(f"run_dir={dirs}: export takes one run directory")
    run = inference.load_run(dirs[0])
    dtype = DTYPES.get(resolve_dtype(cfg.dtype or run.cfg.model.dtype))
    if dtype is None:
        raise ConfigError([f"dtype={cfg.dtype!r}: expected one of {sorted(DTYPES)}"])
    # never into a run directory, and overwrite=true replaces only a previous export (its marker file)
    out = safe_output_dir(Path(cfg.out) if cfg.out else run.path / MERGED_DIR, EXPORT_FILE, bool(cfg.overwrite))

    import torch
    from transformers import AutoModelForCausalLM

    from lora_exp.model.load import load_tokenizer, torch_dtype

    folder = inference.base_folder(run)
    tokenizer = load_tokenizer(folder)
    batch = sample_batch(run, tokenizer, int(cfg.check_examples))
    quant = inference.quant_name(run.cfg)
    if quant is None:
        model = inference.attach_adapters(inference.load_base(run, folder, dtype="float32"), [run])
        reference = logits(model, batch)
    else:
        model = inference.attach_adapters(inference.load_base(run, folder), [run])
        reference = logits(model, batch)  # the quantized model the adapter was trained with
        model = inference.attach_adapters(dequantized(model.unload()), [run])
    merged = model.merge_and_unload()
    merged_logits = logits(merged, batch)

    merged.to(torch_dtype(dtype))
    merged.config.use_cache = True  # training switched the KV cache off; generation wants it
    merged.config.name_or_path = str(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save(merged, tokenizer, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written folder behind
        raise
    del merged, model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype(dtype))
    reloaded_logits = logits(reloaded, batch)
    del reloaded

    record = {
        "run_dir": str(run.path),
        "adapter": str(run.adapter_dir),
        "base_model": folder,
        "quant": quant or "none",
        "dtype": dtype,
        "check_tokens": int(batch["attention_mask"].sum()),
        "max_abs_logit_diff/merged_float32": max_diff(merged_logits, reference, batch),
        f"max_abs_logit_diff/saved_{dtype}": max_diff(reloaded_logits, reference, batch),
        "logit_scale": float(reference[batch["attention_mask"].bool()].abs().max()),
    }
    try:
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, out)  # the previous export goes only once the new one is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    against = f"{quant} base + adapter as trained" if quant else "base + unmerged adapter (float32)"
    print(f"merged model: {out} ({dtype})")
    print(f"largest |logit difference| vs {against}, on {record['check_tokens']} tokens of held-out examples:")
    for label, key in (("merged (float32)", "merged_float32"), (f"saved folder ({dtype})", f"saved_{dtype}")):
        print(f"  {label + ':':<26}{record['max_abs_logit_diff/' + key]:.3e}")
    print(f"  (largest |logit| {record['logit_scale']:.2f})")
    if quant:
        print(
            f"  merging into the dequantized {quant} base changes the logits by the drift above;"
            " the merged model is not re-quantized"
        )
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return record


def _save(merged, tokenizer, folder: Path) -> None:
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def dequantized(base):
    """The 4/8-bit base as plain float32 weights: the values the quantized model computed with.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks 4-bit weights into a CPU kernel layout at
    the first inference forward, and ``dequantize`` then reads that layout as if it were the
    standard one, returning garbage weights; the packing is undone first.
    """
    import torch

    for module in base.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = weight.quant_state
    base = base.dequantize()
    return base.to(torch.float32)


def sample_batch(run, tokenizer, n: int) -> dict:
    """The first ``n`` held-out examples of the run's data as one padded batch (as evaluation sees them)."""
    import torch

    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.errors import UserError

    try:
        datamodule = InstructionDataModule(run.cfg.data, tokenizer, run.cfg.seed)
        datamodule.setup("validate")
        batch = next(iter(datamodule.val_dataloader()), None)
    except UserError as e:  # the run's data moved: any chat text checks the merge as well
        print(f"note: the run's data is not readable ({e}); checking the merge on a fixed prompt", file=sys.stderr)
        batch = None
    if batch is None:
        messages = [{"role": "user", "content": "Name three cities in Europe."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = torch.tensor([ids["input_ids"]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: batch[k][: max(n, 1)] for k in ("input_ids", "attention_mask")}


def logits(model, batch: dict):
    """Float32 logits of ``batch`` on the CPU (no autocast: the comparison measures the weights)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        )
    return out.logits.float().cpu()


def max_diff(a, b, batch: dict) -> float:
    """Largest absolute difference at real (non-padding) positions."""
    mask = batch["attention_mask"].bool()
    return float((a[mask] - b[mask]).abs().max())
