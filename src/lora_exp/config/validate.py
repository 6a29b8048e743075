"""Config validation: every problem a user typed is reported at once."""

from __future__ import annotations

from pathlib import Path

from lora_exp.config import config_dir
from lora_exp.errors import ConfigError
from lora_exp.model.load import DTYPES


def _number(
    cfg, key: str, problems: list[str], low=None, high=None, low_open=False, high_open=False, integer=False
) -> None:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value is None:
        problems.append(f"{key} is missing")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        problems.append(f"{key}={value!r}: expected {'an integer' if integer else 'a number'}")
        return
    if low is not None and (value <= low if low_open else value < low):
        problems.append(f"{key}={value}: must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
        problems.append(f"{key}={value}: must be {'<' if high_open else '<='} {high}")


def validate(cfg) -> None:
    """Check every user-facing key before any weight is loaded; raise one ``ConfigError`` listing all problems."""
    from lora_exp.model.lora import TARGET_PRESETS, resolve_target_modules

    problems: list[str] = []
    _number(cfg, "lora.r", problems, low=1, integer=True)
    _number(cfg, "lora.alpha", problems, low=0, low_open=True)
    _number(cfg, "lora.dropout", problems, low=0, high=1, high_open=True)
    _number(cfg, "data.max_seq_len", problems, low=1, integer=True)
    _number(cfg, "data.batch_size", problems, low=1, integer=True)
    _number(cfg, "optim.lr", problems, low=0, low_open=True)
    _number(cfg, "optim.weight_decay", problems, low=0)
    _number(cfg, "seed", problems, low=0, integer=True)
    try:
        targets = resolve_target_modules(cfg.lora.target_modules)
        if not targets:
            problems.append("lora.target_modules is empty")
        bad = [t for t in targets if not t.replace("_", "").replace(".", "").isalnum()]
        if bad:
            problems.append(f"lora.target_modules={bad}: not module names; presets are {sorted(TARGET_PRESETS)}")
    except Exception as e:
        problems.append(f"lora.target_modules: {e}")
    init = cfg.lora.get("init", "default")
    if init not in ("default", "gaussian", "pissa", "olora", "eva", None) and not str(init).startswith("pissa_niter_"):
        problems.append(f"lora.init={init!r}: expected default, gaussian, pissa or olora")
    if cfg.model.get("dtype") not in DTYPES:
        problems.append(f"model.dtype={cfg.model.get('dtype')!r}: expected one of {sorted(DTYPES)}")
    if cfg.model.get("path") and not (Path(cfg.model.path).expanduser() / "config.json").is_file():
        problems.append(f"model.path={cfg.model.path}: not an HF model folder (no config.json)")
    loss_impl = (cfg.get("loss") or {}).get("impl", "chunked")
    if loss_impl not in ("chunked", "full"):
        problems.append(f"loss.impl={loss_impl!r}: expected chunked or full")
    if cfg.model.get("source") not in ("embedded", "random", "hub"):
        problems.append(f"model.source={cfg.model.get('source')!r}: expected embedded, random or hub")
    _check_scale(cfg, problems)
    check_run_keys(cfg, problems)
    check_targets_and_secrets(cfg, problems)
    if problems:
        raise ConfigError(problems)


def _check_scale(cfg, problems: list[str]) -> None:
    """Quantization, backend, LoRA+ and distributed-strategy keys (issue: scale)."""
    import importlib.util

    from omegaconf import OmegaConf

    from lora_exp.model import quant
    from lora_exp.model.load import check_backend

    quant.check(cfg, problems)
    check_backend(cfg.model, problems)
    for key in ("gradient_checkpointing", "compile"):
        if not isinstance(cfg.model.get(key, False), bool):
            problems.append(f"model.{key}={cfg.model.get(key)!r}: expected true or false")
    if cfg.optim.get("loraplus_lr_ratio") is not None:
        _number(cfg, "optim.loraplus_lr_ratio", problems, low=1)
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    if isinstance(strategy, str) and strategy.startswith("deepspeed") and not importlib.util.find_spec("deepspeed"):
        problems.append(f"trainer.strategy={strategy} needs DeepSpeed: pip install deepspeed (CUDA GPUs)")


# ------------------------------------------------------------------ robustness: ranges, paths, secrets, targets

# `_target_`s may name only callables in these packages: a shared config file cannot make
# `python -m lora_exp.train` import and run arbitrary code. Extend with $LORA_EXP_ALLOWED_TARGETS
# (comma-separated prefixes) for your own callbacks or loggers.
ALLOWED_TARGET_PREFIXES = (
    "lora_exp.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
    "pytorch_lightning.callbacks.",
    "pytorch_lightning.loggers.",
    "torch.optim.",
    "transformers.optimization.",
    "transformers.get_",  # schedule factories re-exported at the top level
    "bitsandbytes.optim.",
    "peft.",
)
_SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password", "passwd", "credential")
_SPECIAL_TOKENS = ("pad_token", "bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token")


def is_secret_key(key: str) -> bool:
    """True for config keys that would hold a credential (``api_key``, ``hf_token``, ``password``...).

    Token counts, token ids, special tokens and tokenizer settings are not credentials.
    """
    k = str(key).lower()
    if k.endswith("_id") or "tokens" in k or "tokenizer" in k or k.startswith("token_") or k in _SPECIAL_TOKENS:
        return False
    return any(w in k for w in _SECRET_WORDS)


def allowed_target(target: str) -> bool:
    import os

    extra = tuple(p.strip() for p in os.environ.get("LORA_EXP_ALLOWED_TARGETS", "").split(",") if p.strip())
    return str(target).startswith(ALLOWED_TARGET_PREFIXES + extra)


def _walk(node, path: str = ""):
    """(dotted key, value) of every leaf and node in a config, without resolving interpolations."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        for key in node.keys():
            child = node._get_node(key)
            sub = f"{path}.{key}" if path else str(key)
            value = child._value() if not isinstance(child, (DictConfig, ListConfig)) else child
            yield sub, value
            if isinstance(child, (DictConfig, ListConfig)) and not OmegaConf.is_missing(node, key):
                yield from _walk(child, sub)
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False) if hasattr(node, "_iter_ex") else node):
            sub = f"{path}[{i}]"
            yield sub, child
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _walk(child, sub)


def check_targets_and_secrets(cfg, problems: list[str]) -> None:
    """``_target_`` values outside the allow-list; secret-looking keys or secret values in the config.

    Secrets belong in the environment (``WANDB_API_KEY``, ``HF_TOKEN``) or ``wandb login``; a config
    is saved in the run directory and sent to W&B. The message never repeats the secret.
    """
    import os

    from lora_exp.runs.rundir import SECRET_ENV

    secrets = [os.environ[k] for k in SECRET_ENV if len(os.environ.get(k) or "") >= 8]
    for key, value in _walk(cfg):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "_target_" and isinstance(value, str) and not allowed_target(value):
            problems.append(
                f"{key}={value}: not an allowed target; allowed: {', '.join(ALLOWED_TARGET_PREFIXES)}* "
                f"(add prefixes with LORA_EXP_ALLOWED_TARGETS)"
            )
        if isinstance(value, str) and value:
            if is_secret_key(leaf) and not value.startswith("${oc.env:"):
                problems.append(f"{key}: looks like a secret; set it in the environment (WANDB_API_KEY, HF_TOKEN)")
            elif any(s in value for s in secrets):
                problems.append(f"{key}: holds the value of a secret environment variable; remove it from the config")


def check_run_keys(cfg, problems: list[str]) -> None:
    """Trainer, checkpoint, resume and path keys users type."""
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, "checkpoint.every_n_steps") is not None:
        _number(cfg, "checkpoint.every_n_steps", problems, low=1, integer=True)
    if not isinstance(cfg.get("resume", False), bool):
        problems.append(f"resume={cfg.get('resume')!r}: expected true or false")
    for key, value in (cfg.get("speed") or {}).items():
        if not isinstance(value, bool):
            problems.append(f"speed.{key}={value!r}: expected true or false")
    for key, low in (("trainer.max_steps", -1), ("trainer.accumulate_grad_batches", 1), ("trainer.devices", 1)):
        value = OmegaConf.select(cfg, key)
        if value is not None and not (key == "trainer.devices" and isinstance(value, (str, list))):
            _number(cfg, key, problems, low=low, integer=True)
    if OmegaConf.select(cfg, "trainer.max_epochs") is not None:
        _number(cfg, "trainer.max_epochs", problems, low=-1, integer=True)
    if OmegaConf.select(cfg, "data.eval_batch_size") is not None:
        _number(cfg, "data.eval_batch_size", problems, low=1, integer=True)
    if OmegaConf.select(cfg, "optim.warmup_ratio") is not None:
        _number(cfg, "optim.warmup_ratio", problems, low=0, high=1)
    if OmegaConf.select(cfg, "optim.warmup_steps") is not None:
        _number(cfg, "optim.warmup_steps", problems, low=0, integer=True)
    precision = OmegaConf.select(cfg, "trainer.precision")
    known = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")
    if precision is not None and str(precision) not in known:
        problems.append(f"trainer.precision={precision!r}: expected one of {list(known)}")
    for key in ("data.train_path", "data.val_path"):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value and "://" not in value and not Path(value).expanduser().exists():
            problems.append(f"{key}={value}: no such file")


_CONFIG_FLAGS = ("--config-path", "-cp", "--config-dir", "-cd", "--config-name", "-cn")


def override_problems(args: list[str], config_name: str = "train") -> list[str]:
    """Unknown group options (``model=foo``) and unknown keys (``lora.rr=3``) among command-line overrides.

    Hydra stops at the first of these with a long message and exit status 1; this lists them all,
    with the options that do exist. Overrides it cannot judge (``+key``, ``~key``, ``hydra.*``,
    another config via ``--config-path``) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.split("=", 1)[0] in _CONFIG_FLAGS for a in args):
        return []
    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return []  # a syntax error: Hydra's own message points at it
    conf = Path(config_dir())
    problems, groups, keys = [], [], []
    for o in parsed:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or key.split(".")[0].split("/")[0] == "hydra":
            continue
        if (conf / key).is_dir():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            options = sorted(p.stem for p in (conf / key).glob("*.yaml"))
            bad = [v for v in values if v not in (None, "null") and str(v) not in options]
            if bad:
                problems.append(f"{key}={','.join(map(str, bad))}: no such option; {key} options are {options}")
            else:
                groups.append(o.input_line)
        else:
            keys.append(key)
    if keys:
        try:
            from hydra import compose, initialize_config_dir
            from omegaconf import OmegaConf

            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                cfg = compose(config_name, overrides=[g for g in groups if "," not in g])
            for key in keys:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if node is None or not OmegaConf.is_dict(node) or leaf not in node:
                    near = sorted(node.keys()) if OmegaConf.is_dict(node) else []
                    hint = f"; keys under {parent or 'the top level'} are {near}" if near else ""
                    problems.append(f"{key}: no such config key{hint} (use +{key}=... to add a new one)")
        except Exception:
            pass  # composition itself failed: Hydra reports why
    return problems


def exit_on_bad_overrides(args: list[str]) -> None:
    """Print every unknown option or key on the command line as one error and exit with status 2."""
    import os
    import sys

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    problems = override_problems(args)
    if problems:
        print(f"lora_exp.train: error: {ConfigError(problems)}", file=sys.stderr, flush=True)
        sys.exit(2)
