"""LoRA configuration and wrapping through PEFT.

The ``lora`` config group speaks PEFT: every ``peft.LoraConfig`` field is a ``lora.*`` key
(``+lora.rank_pattern={q_proj:4}``, ``+lora.exclude_modules=[...]``, ...) and reaches PEFT as
given. The project's short names stay (``alpha``, ``dropout``, ``init``, target presets), with
PEFT's own names as aliases. ``lora.budget`` solves per-module ranks (:mod:`lora_exp.model.budget`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import re
from typing import Any

log = logging.getLogger(__name__)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS: dict[str, list[str]] = {
    "qv": ["q_proj", "v_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj"],
    "qkvo": ATTENTION,
    "mlp": MLP,
    "all_linear": ATTENTION + MLP,
}
ALL_LINEAR = "all-linear"  # PEFT's spelling: every linear layer but the output head
# A target string made of these (comma-separated) is a list of module names; anything else is a
# regular expression, which PEFT matches against each module's full name (re.fullmatch).
_NAME = re.compile(r"[A-Za-z0-9_.]+")

# project key -> PEFT's LoraConfig field; PEFT's names are accepted as aliases
ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
PEFT_NAMES = {v: k for k, v in ALIASES.items()}
# project-only keys (not LoraConfig fields)
PROJECT_KEYS = {"alpha", "dropout", "init", "budget"}
# LoraConfig fields lora-exp sets itself: a user value would break the run or its saved adapter
MANAGED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}
MANAGED |= {"inference_mode"}
# lora.init values: PEFT's init_lora_weights that need nothing but the base weights
INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")  # and pissa_niter_<n>


def peft_fields() -> list[str]:
    """Names of every ``peft.LoraConfig`` field."""
    from peft import LoraConfig

    return [f.name for f in dataclasses.fields(LoraConfig)]


def settings(lora_cfg) -> dict[str, Any]:
    """The ``lora`` group as a plain dict keyed by the project's names (PEFT aliases folded in)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(lora_cfg, resolve=True) if OmegaConf.is_config(lora_cfg) else dict(lora_cfg)
    out = {k: v for k, v in raw.items() if k not in ALIASES}
    for alias, name in ALIASES.items():
        if alias in raw:
            out[name] = raw[alias]
    return out


def resolve_target_modules(value: Any) -> list[str] | str:
    """``lora.target_modules`` as PEFT takes it.

    A preset name (``qv``, ``qkvo``, ``mlp``, ``all_linear``...) or a comma-separated string of
    module names gives a list; ``all-linear`` and a regular expression stay strings.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        if value in TARGET_PRESETS:
            return list(TARGET_PRESETS[value])
        names = [v.strip() for v in value.split(",") if v.strip()]
        if value.lower() == ALL_LINEAR or not all(_NAME.fullmatch(n) for n in names):
            return value
        return names
    return [str(v) for v in value]


def lora_scaling(lora_cfg) -> float:
    """The factor PEFT multiplies the LoRA update by: alpha/r, or alpha/sqrt(r) with rsLoRA.

    Under ``lora.budget`` every module keeps this factor (see :mod:`lora_exp.model.budget`).
    """
    s = settings(lora_cfg)
    r = s["r"]
    return s["alpha"] / (math.sqrt(r) if s.get("use_rslora") else r)


def peft_kwargs(lora_cfg) -> dict[str, Any]:
    """``LoraConfig`` keyword arguments: every ``lora.*`` key under PEFT's name, plain containers."""
    s = settings(lora_cfg)
    s.pop("budget", None)
    init = s.pop("init", "default")
    kwargs = {PEFT_NAMES.get(k, k): v for k, v in s.items()}
    kwargs.update(
        task_type="CAUSAL_LM",
        init_lora_weights=True if init in (None, "default") else init,
        target_modules=resolve_target_modules(s.get("target_modules")),
    )
    return kwargs


def peft_config(lora_cfg, model=None):
    """Build PEFT's ``LoraConfig`` from the ``lora`` config group.

    With ``lora.budget`` the ranks are solved from ``model``'s module shapes (required then).
    """
    from peft import LoraConfig

    config = LoraConfig(**peft_kwargs(lora_cfg))
    budget_value = settings(lora_cfg).get("budget")
    if budget_value is None:
        return config
    from lora_exp.errors import ConfigError
    from lora_exp.model import budget

    if model is None:
        raise ConfigError(["lora.budget: ranks are solved from the model's modules; this path builds no model"])
    return budget.solve(model, config, int(budget_value)).config


def _check_targets(model, lora_cfg) -> None:
    """Module names that match nothing, or a pattern that matches nothing: one error naming them."""
    from lora_exp.errors import ConfigError

    targets = resolve_target_modules(settings(lora_cfg)["target_modules"])
    linear = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if type(m).__name__ == "Linear" or hasattr(m, "weight") and getattr(m.weight, "ndim", 0) == 2
        }
    )
    if isinstance(targets, str):
        if targets.lower() != ALL_LINEAR and not any(re.fullmatch(targets, n) for n, _ in model.named_modules()):
            raise ConfigError([f"lora.target_modules={targets!r} matches no module; its linear modules are {linear}"])
        return
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    missing = sorted(t for t in targets if t not in present and not any(n.endswith("." + t) for n in present))
    if missing:
        raise ConfigError([f"lora.target_modules: {missing} not found in the model; its linear modules are {linear}"])


def wrap(model, lora_cfg):
    """Wrap ``model`` with LoRA adapters; only adapter parameters are left trainable.

    The global RNG must be seeded before this call: PEFT draws the LoRA A matrices from it.
    """
    from peft import get_peft_model

    _check_targets(model, lora_cfg)
    config = peft_config(lora_cfg, model)
    asked = config.target_modules  # PEFT expands all-linear in place; the saved config keeps the ask
    peft_model = get_peft_model(model, config)
    peft_model.lora_exp_target_modules = asked
    if settings(lora_cfg).get("budget") is not None:
        from lora_exp.model import budget

        log.info("%s", budget.describe(peft_model, int(settings(lora_cfg)["budget"])))
    return peft_model


@contextlib.contextmanager
def _as_asked(peft_model):
    """Save ``target_modules`` as the user gave them (``all-linear``), not PEFT's expansion of it."""
    config = peft_model.peft_config["default"]
    asked = getattr(peft_model, "lora_exp_target_modules", None)
    expanded = config.target_modules
    if isinstance(asked, str):
        config.target_modules = asked
    try:
        yield config
    finally:
        config.target_modules = expanded


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
    init = str(settings(lora_cfg).get("init") or "default")
    return init.startswith("pissa") or init == "olora"


def save_initial_adapter(peft_model, path) -> None:
    """Save the adapter as initialised, before any training: the reference for :func:`save_adapter`.

    Its config is saved as a plain LoRA init (as PEFT's PiSSA docs ask), so loading it never
    repeats the decomposition.
    """
    with _as_asked(peft_model) as config:
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
    with _as_asked(peft_model):
        peft_model.save_pretrained(str(path), **kwargs)


# --------------------------------------------------------------------------- checks


def _declared() -> tuple:
    """The ``lora.*`` keys with fixed kinds and bounds (PEFT's own checks cover the rest)."""
    import typing

    from peft import LoraConfig

    from lora_exp.config.schema import Check

    return (
        Check("lora.r", "int", low=1),
        Check("lora.alpha", "number", low=0, low_open=True),
        Check("lora.dropout", "number", low=0, high=1, high_open=True),
        Check("lora.budget", "int", low=1, optional=True),
        Check(
            "lora.bias", "choice", choices=typing.get_args(typing.get_type_hints(LoraConfig)["bias"]), default="none"
        ),
        Check("lora.use_rslora", "bool", default=False),
        Check("lora.use_dora", "bool", default=False),
        Check("lora.init", "choice", choices=(None, True, False, *INITS), prefixes=("pissa_niter_",), default=None),
    )


def unknown_key_problem(key: str) -> str | None:
    """``lora.<key>`` is no LoRA setting: the message names the closest one; None if it is one."""
    known = set(peft_fields()) | PROJECT_KEYS
    if key in known:
        return None
    near = closest_setting(key)
    hint = f"did you mean {near}?" if near else "the keys are peft.LoraConfig's fields and budget"
    return f"lora.{key}: no such LoRA setting; {hint}"


def closest_setting(key: str) -> str | None:
    """The LoRA setting nearest to ``key`` (difflib), or None when ``key`` is one or none is near."""
    known = set(peft_fields()) | PROJECT_KEYS
    if key in known:
        return None
    near = difflib.get_close_matches(key, sorted(known - MANAGED - set(PEFT_NAMES.values())), n=1, cutoff=0.4)
    return near[0] if near else None


def _explicit(lora_cfg, key: str) -> bool:
    """Whether the user set ``lora.<key>`` (on the command line, or away from the shipped default)."""
    from omegaconf import OmegaConf

    from lora_exp.config import config_dir

    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            task = HydraConfig.get().overrides.task
            if any(o.lstrip("+~").split("=", 1)[0] == f"lora.{key}" for o in task):
                return True
    shipped = OmegaConf.load(f"{config_dir()}/lora/default.yaml")
    return lora_cfg.get(key) != shipped.get(key)


def _check_targets_value(value, problems: list[str]) -> None:
    try:
        targets = resolve_target_modules(value)
    except Exception as e:
        problems.append(f"lora.target_modules: {e}")
        return
    if not targets:
        problems.append("lora.target_modules is empty")
    elif isinstance(targets, str) and targets.lower() != ALL_LINEAR:
        try:
            re.compile(targets)
        except re.error as e:
            problems.append(
                f"lora.target_modules='{targets}': neither module names, a preset ({', '.join(TARGET_PRESETS)}, "
                f"{ALL_LINEAR}) nor a valid regular expression ({e})"
            )


def check(cfg_lora, problems: list[str]) -> None:
    """Every problem in the ``lora`` group, appended to ``problems`` (gathered by ``validate``)."""
    import warnings

    from omegaconf import OmegaConf
    from peft import LoraConfig

    from lora_exp.config.schema import run_checks

    before = len(problems)
    for key in cfg_lora.keys():
        problem = unknown_key_problem(str(key))
        if problem:
            problems.append(problem)
        elif key in MANAGED:
            problems.append(f"lora.{key}: set by lora-exp itself; remove it")
    for alias, name in ALIASES.items():
        if alias in cfg_lora and name in cfg_lora and _explicit(cfg_lora, name):
            problems.append(f"lora.{alias} and lora.{name} are the same setting (PEFT's name and ours); give one")
    s = settings(cfg_lora)
    run_checks(OmegaConf.create({"lora": s}), _declared(), problems)
    _check_targets_value(s.get("target_modules"), problems)
    if s.get("budget") is not None:
        from lora_exp.model.budget import check as check_budget

        check_budget(s, problems)
    if len(problems) > before:
        return  # PEFT's own checks would repeat the ones above less clearly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            LoraConfig(**peft_kwargs(cfg_lora))
        except (TypeError, ValueError, ImportError) as e:
            problems.append(f"lora: PEFT refuses these settings: {e}")
