"""Declared config checks: each subpackage lists the keys it reads as ``Check`` rows.

A row names a dotted key, the kind of value it takes and its bounds; ``run_checks`` turns the
rows into problem lines for :func:`lora_exp.config.validate.validate`, which reports them all at
once. ``speed.*`` in a key stands for every key under ``speed``.

    CHECKS = (
        Check("lora.r", "int", low=1),
        Check("optim.warmup_ratio", "number", low=0, high=1, optional=True),
        Check("loss.impl", "choice", choices=("chunked", "full"), default="chunked"),
    )
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("int", "number", "bool", "choice", "file", "hf_folder")
_UNSET = object()


@dataclass(frozen=True)
class Check:
    """One config key a subpackage reads, and what it accepts.

    Args:
        key: dotted key (``trainer.max_steps``); ``group.*`` checks every key under ``group``.
        kind: ``int`` or ``number`` (with ``low``/``high`` bounds), ``bool``, ``choice`` (one of
            ``choices``), ``file`` (an existing path, or a URL) or ``hf_folder`` (a folder with a
            ``config.json``).
        low: smallest value allowed (excluded with ``low_open``).
        high: largest value allowed (excluded with ``high_open``).
        choices: the values a ``choice`` accepts.
        prefixes: for ``choice``, families of values accepted by their start (``pissa_niter_``).
        optional: a missing or null value is fine (otherwise it is a problem).
        default: the value assumed when the key is absent (``choice`` and ``bool`` keys).
        text_ok: for ``int``, strings and lists pass unchecked (``trainer.devices=auto``, ``[0,1]``).
    """

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    prefixes: tuple[str, ...] = ()
    optional: bool = False
    default: Any = _UNSET
    text_ok: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Check({self.key!r}): kind {self.kind!r} is not one of {KINDS}")

    def problems(self, cfg) -> list[str]:
        """The problems with this key in ``cfg`` (empty when it is fine)."""
        from omegaconf import OmegaConf

        if self.key.endswith(".*"):
            group = OmegaConf.select(cfg, self.key[:-2]) or {}
            rows = [_replace(self, f"{self.key[:-2]}.{k}") for k in group]
            return [p for row in rows for p in row.problems(cfg)]
        value = OmegaConf.select(cfg, self.key, default=_UNSET)
        if value is _UNSET and self.default is not _UNSET:
            value = self.default
        if value is _UNSET or value is None or (value == "" and self.kind in ("file", "hf_folder")):
            if self.optional or (value is None and None in self.choices):
                return []
            return [f"{self.key} is missing"]
        return _KIND_CHECKS[self.kind](self, value)


def run_checks(cfg, checks: Iterable[Check], problems: list[str]) -> None:
    """Append the problems of every row in ``checks`` to ``problems``."""
    for check in checks:
        problems.extend(check.problems(cfg))


def _replace(check: Check, key: str) -> Check:
    from dataclasses import replace

    return replace(check, key=key)


def _number(check: Check, value) -> list[str]:
    integer = check.kind == "int"
    if integer and check.text_ok and (isinstance(value, str) or _is_list(value)):
        return []
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        return [f"{check.key}={value!r}: expected {'an integer' if integer else 'a number'}"]
    if check.low is not None and (value <= check.low if check.low_open else value < check.low):
        return [f"{check.key}={value}: must be {'>' if check.low_open else '>='} {check.low}"]
    if check.high is not None and (value >= check.high if check.high_open else value > check.high):
        return [f"{check.key}={value}: must be {'<' if check.high_open else '<='} {check.high}"]
    return []


def _bool(check: Check, value) -> list[str]:
    return [] if isinstance(value, bool) else [f"{check.key}={value!r}: expected true or false"]


def _choice(check: Check, value) -> list[str]:
    if value in check.choices or (isinstance(value, str) and value.startswith(check.prefixes)):
        return []
    names = [c for c in check.choices if c is not None] + [f"{p}*" for p in check.prefixes]
    return [f"{check.key}={value!r}: expected one of {names}"]


def _file(check: Check, value) -> list[str]:
    if not isinstance(value, str) or not value or "://" in value or Path(value).expanduser().exists():
        return []
    return [f"{check.key}={value}: no such file"]


def _hf_folder(check: Check, value) -> list[str]:
    if (Path(str(value)).expanduser() / "config.json").is_file():
        return []
    return [f"{check.key}={value}: not an HF model folder (no config.json)"]


def _is_list(value) -> bool:
    from omegaconf import OmegaConf

    return isinstance(value, (list, tuple)) or OmegaConf.is_list(value)


_KIND_CHECKS = {
    "int": _number,
    "number": _number,
    "bool": _bool,
    "choice": _choice,
    "file": _file,
    "hf_folder": _hf_folder,
}
