"""``python -m lora_exp.generate run_dir=DIR prompt="..."``: text from the base model + a trained adapter.

The prompt goes through the tokenizer's chat template (as in training), tokens are streamed to
stdout as they are generated, and without ``prompt=`` the command is a chat in the terminal that
keeps the conversation. Status lines go to stderr, so stdout holds only the model's text.
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig

FREE_TEXT_KEYS = ("prompt", "system")
EXIT_COMMANDS = ("/exit", "/quit")


def check(cfg: DictConfig) -> None:
    """Every problem with the sampling options, at once."""
    from lora_exp.errors import ConfigError

    problems = []
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 1:
        problems.append(f"max_new_tokens={cfg.max_new_tokens!r}: expected an integer >= 1")
    if not isinstance(cfg.temperature, (int, float)) or cfg.temperature < 0:
        problems.append(f"temperature={cfg.temperature!r}: expected a number >= 0 (0 = greedy)")
    if not isinstance(cfg.top_p, (int, float)) or not 0 < cfg.top_p <= 1:
        problems.append(f"top_p={cfg.top_p!r}: expected a number in (0, 1]")
    if not isinstance(cfg.seed, int):
        problems.append(f"seed={cfg.seed!r}: expected an integer")
    if cfg.prompt is not None and not str(cfg.prompt).strip():  # `prompt=` would generate from nothing
        problems.append('prompt is empty: pass the text to answer (prompt="..."), or leave prompt out to chat')
    if problems:
        raise ConfigError(problems)


def generate(cfg: DictConfig) -> list[str]:
    """Answer ``cfg.prompt``, or chat on stdin when it is null; return the replies."""
    from lora_exp.errors import RunDirError
    from lora_exp.inference import session as inference

    check(cfg)
    dirs = inference.run_dirs(cfg.run_dir)
    if len(dirs) != 1:
        raise RunDirError(f"run_dir={dirs}: generate takes one run directory")
    run = inference.load_run(dirs[0])

    from transformers import set_seed

    from lora_exp.model.load import load_tokenizer

    folder = inference.base_folder(run)
    tokenizer = load_tokenizer(folder)
    if not tokenizer.chat_template:
        raise RunDirError(f"{folder}: the tokenizer has no chat template")
    model = inference.load_base(run, folder, dtype=cfg.dtype or _default_dtype(run))
    if cfg.adapter:
        model = inference.attach_adapters(model, [run])
    if inference.quant_name(run.cfg) is None:
        model.to(inference.device())
    what = f"adapter {run.adapter_dir}" if cfg.adapter else "the base model alone (adapter=false)"
    print(f"[lora_exp.generate] {what} on {folder}", file=sys.stderr, flush=True)
    set_seed(cfg.seed)

    system = [{"role": "system", "content": str(cfg.system)}] if cfg.system else []
    if cfg.prompt is not None:
        return [reply(model, tokenizer, [*system, {"role": "user", "content": str(cfg.prompt)}], cfg)]
    return chat(model, tokenizer, system, cfg)


def _default_dtype(run) -> str | None:
    """float32 on a CPU (token-by-token bf16 matmuls are slower there), else the run's ``model.dtype``."""
    from lora_exp.inference import session as inference

    if inference.device() == "cpu" and inference.quant_name(run.cfg) is None:
        return "float32"
    return None


def chat(model, tokenizer, system: list[dict], cfg: DictConfig) -> list[str]:
    """A conversation in the terminal (or over piped stdin): the whole history goes into each turn."""
    print("Chat with the model: an empty line, /exit or Ctrl-D ends, /reset starts over.", file=sys.stderr)
    messages = list(system)
    replies = []
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            break
        text = text.strip()
        if not text or text in EXIT_COMMANDS:
            break
        if text == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        answer = reply(model, tokenizer, messages, cfg)
        messages.append({"role": "assistant", "content": answer})
        replies.append(answer)
    return replies


def reply(model, tokenizer, messages: list[dict], cfg: DictConfig) -> str:
    """Generate the assistant's next turn, streaming tokens to stdout; return its text."""
    import torch
    from transformers import TextStreamer

    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        args = sampling(model, tokenizer, cfg)
        out = model.generate(**inputs, streamer=streamer, use_cache=True, pad_token_id=tokenizer.pad_token_id, **args)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def sampling(model, tokenizer, cfg: DictConfig) -> dict[str, Any]:
    """``generate`` arguments: greedy at temperature 0, else temperature + nucleus sampling.

    Generation stops at the tokenizer's EOS and at any end token the model's generation config
    names (Llama 3 instruct ends turns with ``<|eot_id|>``).
    """
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    eos.add(tokenizer.eos_token_id)
    args: dict[str, Any] = {"max_new_tokens": int(cfg.max_new_tokens), "eos_token_id": sorted(eos)}
    if cfg.temperature > 0:
        args.update(do_sample=True, temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=0)
    else:
        args.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return args
