"""Config validation: every problem a user typed is reported at once."""

from __future__ import annotations

from pathlib import Path

from lora_exp.config import config_dir
from lora_exp.config.security import is_secret_key  # noqa: F401  (re-exported: runs.rundir redacts with it)
from lora_exp.errors import ConfigError

# Each subpackage declares the keys it reads (``Check`` rows, see config/schema.py) and checks
# them in a ``check(node, problems)``; ``validate`` runs them all and reports every problem at
# once. (module, the config node it is given: None for the whole config)
GROUP_CHECKS = (
    ("lora_exp.model.checks", None),  # model.*, quant.*
    ("lora_exp.model.lora", "lora"),  # lora.*: every LoraConfig field, PEFT's aliases
    ("lora_exp.data.checks", None),  # data.*
    ("lora_exp.training.checks", None),  # trainer.*, optim.*, loss, speed, checkpoint, resume, seed
    ("lora_exp.config.security", None),  # every _target_ imports; no secret in the config
)


def validate(cfg) -> None:
    """Check every user-facing key before any weight is loaded; raise one ``ConfigError`` listing all problems."""
    import importlib

    problems: list[str] = []
    for module, node in GROUP_CHECKS:
        importlib.import_module(module).check(cfg if node is None else cfg[node], problems)
    if problems:
        raise ConfigError(problems)


_CONFIG_FLAGS = ("--config-path", "-cp", "--config-dir", "-cd", "--config-name", "-cn")
# Hydra flags that are not a run (shell completion answers partial command lines itself)
_NOT_A_RUN = ("-sc", "--shell-completion")
# Hydra flags whose value is the next argument, not an override
_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--info", "--experimental-rerun")


def override_problems(args: list[str], config_name: str = "train") -> list[str]:
    """Unknown group options (``model=foo``) and unknown keys (``lora.rr=3``) among command-line overrides.

    Hydra stops at the first of these with a long message and exit status 1; this lists them all,
    with the options that do exist. Overrides it cannot judge (``+key``, ``~key``, ``hydra.*``,
    another config via ``--config-path``) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.split("=", 1)[0] in _CONFIG_FLAGS for a in args):
        return []
    if any(a.split("=", 1)[0] in _NOT_A_RUN for a in args):
        return []
    flag_values = {i + 1 for i, a in enumerate(args) if a in _VALUE_FLAGS}
    overrides = [a for i, a in enumerate(args) if not a.startswith("-") and i not in flag_values]
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

            from lora_exp.model import lora

            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                cfg = compose(config_name, overrides=[g for g in groups if "," not in g])
            for key in keys:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if node is None or not OmegaConf.is_dict(node) or leaf not in node:
                    near = sorted(node.keys()) if OmegaConf.is_dict(node) else []
                    hint = f"; keys under {parent or 'the top level'} are {near}" if near else ""
                    near_lora = parent == "lora" and lora.closest_setting(leaf)  # +lora.<leaf> is refused too
                    add = f"; did you mean {near_lora}?" if near_lora else f" (use +{key}=... to add a new one)"
                    problems.append(f"{key}: no such config key{hint}{add}")
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
