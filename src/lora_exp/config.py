"""Config location and validation: every problem a user typed is reported at once."""

from __future__ import annotations

from pathlib import Path

from lora_exp.errors import ConfigError
from lora_exp.models import DTYPES


def config_dir() -> str:
    """The Hydra config folder: shipped inside the package, or the repository's ``conf/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"lora-exp configs not found next to {here}")


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
    from lora_exp.lora import TARGET_PRESETS, resolve_target_modules

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
    if problems:
        raise ConfigError(problems)
