"""Whole-config checks: every ``_target_`` imports, and no credential sits in a config.

A config is code a user trusts, as in Hydra: a ``_target_`` may name any importable callable
(a user's own callback, an optimizer from another package). What is checked is that it imports,
so a typo is reported with its key before any weight is loaded rather than deep inside
``hydra.utils.instantiate``. Secrets belong in the environment: a config is saved in the run
directory and sent to W&B.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# the secret policy (credential keys, secret environment values) is defined once, in runs.secrets,
# which also redacts what Hydra wrote before this check could refuse it
from lora_exp.runs.secrets import is_secret_key, is_secret_value  # noqa: F401


def walk(node, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf and node in a config, without resolving interpolations."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        for key in node.keys():
            child = node._get_node(key)
            sub = f"{path}.{key}" if path else str(key)
            value = child._value() if not isinstance(child, (DictConfig, ListConfig)) else child
            yield sub, value
            if isinstance(child, (DictConfig, ListConfig)) and not OmegaConf.is_missing(node, key):
                yield from walk(child, sub)
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False) if hasattr(node, "_iter_ex") else node):
            sub = f"{path}[{i}]"
            yield sub, child
            if isinstance(child, (DictConfig, ListConfig)):
                yield from walk(child, sub)


def target_problem(key: str, target: str) -> str | None:
    """Why ``target`` cannot be instantiated (it does not import, or is not callable), or None."""
    # what hydra.utils.instantiate itself resolves targets with (get_object would also log the error)
    from hydra._internal.utils import _locate

    try:
        obj = _locate(target)
    except Exception as e:  # Hydra's message spans lines; its last line names the cause
        cause = e.__cause__ or e
        detail = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        return f"{key}={target}: cannot import it ({type(cause).__name__}: {detail})"
    if not callable(obj):
        return f"{key}={target}: imports, but is a {type(obj).__name__}, not a callable"
    return None


def check(cfg, problems: list[str]) -> None:
    """``_target_`` values that do not import; secret-looking keys or secret values anywhere in the config.

    The message never repeats the secret.
    """
    for key, value in walk(cfg):
        leaf = key.rsplit(".", 1)[-1]
        if not isinstance(value, str) or not value:
            continue
        if leaf == "_target_" and not value.startswith("${"):
            problem = target_problem(key, value)
            if problem:
                problems.append(problem)
        if is_secret_key(leaf) and not value.startswith("${oc.env:"):
            problems.append(f"{key}: looks like a secret; set it in the environment (WANDB_API_KEY, HF_TOKEN)")
        elif is_secret_value(value):
            problems.append(f"{key}: holds the value of a secret environment variable; remove it from the config")
