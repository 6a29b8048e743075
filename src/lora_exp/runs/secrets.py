"""The one secret policy: which config keys and environment variables hold credentials, and redaction.

A secret passed on the command line is refused by validation, but Hydra writes ``.hydra/`` before
any lora-exp code runs; :func:`redact_hydra_files` removes it from those files first thing in a
job, so it never stays on disk, in ``run.json``, in logs or in W&B.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# environment variables whose values are secrets: never written anywhere by lora-exp
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
# a secret environment value shorter than this is not searched for inside other text (it would
# match ordinary words); a config value *equal* to it is still refused and redacted
MIN_SECRET_LEN = 8
MASK = "***"

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


def secret_env_values() -> list[str]:
    """The values of the secret environment variables that are set (empty ones ignored)."""
    return [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]


def is_secret_value(value: str) -> bool:
    """Whether ``value`` is, or (for long secrets) contains, the value of a secret environment variable."""
    return any(value == s or (len(s) >= MIN_SECRET_LEN and s in value) for s in secret_env_values())


def _override_parts(arg: str) -> tuple[str, str] | None:
    if "=" not in arg:
        return None
    key, value = arg.split("=", 1)
    return key.lstrip("+~"), value


def secret_override_values(overrides: Iterable[str]) -> list[str]:
    """Values of ``key=value`` overrides that are secrets: a secret-looking key, or a secret's value."""
    found = []
    for arg in overrides:
        parts = _override_parts(str(arg))
        if parts is None:
            continue
        key, value = parts
        stripped = value.strip("'\"")
        if stripped.startswith("${oc.env:"):
            continue  # an interpolation names the variable, it does not hold the secret
        if (is_secret_key(key.rsplit(".", 1)[-1]) and stripped) or (stripped and is_secret_value(stripped)):
            found += [value, stripped]
    return sorted({v for v in found if v}, key=len, reverse=True)


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with any value of a secret-looking key or a secret's value replaced."""
    secrets = [s for s in secret_env_values() if len(s) >= MIN_SECRET_LEN]
    out = []
    for arg in argv:
        parts = _override_parts(arg)
        if parts is not None:
            key, value = parts
            value = value.strip("'\"")
            if (is_secret_key(key.rsplit(".", 1)[-1]) and not value.startswith("${oc.env:")) or (
                value and value in secret_env_values()
            ):
                arg = f"{arg.split('=', 1)[0]}={MASK}"
        for secret in secrets:
            arg = arg.replace(secret, MASK)
        out.append(arg)
    return out


def redact_text(text: str, values: Iterable[str]) -> str:
    """``text`` with every occurrence of each value replaced by the mask (longest values first)."""
    for value in sorted({v for v in values if v}, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def redact_files(paths: Iterable[Path], overrides: Iterable[str]) -> list[Path]:
    """Remove secret values (from ``overrides`` and the environment) from ``paths``; return those changed.

    A file is rewritten in place (atomically) only when it held a secret.
    """
    values = secret_override_values(overrides) + [s for s in secret_env_values() if len(s) >= MIN_SECRET_LEN]
    changed = []
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        redacted = redact_text(text, values)
        if redacted != text:
            tmp = path.with_name(f".{path.name}.redact{os.getpid()}")
            tmp.write_text(redacted)
            os.replace(tmp, path)
            changed.append(path)
    return changed


def redact_hydra_files() -> list[Path]:
    """Redact what Hydra wrote for this job (``.hydra/*.yaml``, the sweep's ``multirun.yaml``, the job log).

    Called first thing in a job, before validation refuses the secret. Returns the files changed.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    paths = []
    if hc.output_subdir is not None:
        paths += sorted((out / str(hc.output_subdir)).glob("*.yaml"))
    if hc.sweep.dir:
        paths.append(Path(str(hc.sweep.dir)) / "multirun.yaml")
    paths += sorted(out.glob("*.log"))
    return redact_files([p for p in paths if p.is_file()], [*hc.overrides.task, *hc.overrides.hydra])
