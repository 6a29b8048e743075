"""Trained runs back in memory: a run directory's config, its base model and its adapters.

Shared by ``evaluate``, ``generate`` and ``export``. A run directory holds the resolved train
config (``.hydra/config.yaml``) and a PEFT adapter (``adapter/``); the base model is found through
the adapter's ``base_model_name_or_path`` and, when that folder is gone (a cleaned cache, another
machine), rebuilt from the run's ``model`` config exactly as training found it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_exp.errors import RunDirError
from lora_exp.runs.rundir import ADAPTER_DIR, RunDir


@dataclass
class Run:
    """A finished training run: its :class:`RunDir`, its resolved train config and its adapter name."""

    dir: RunDir
    cfg: DictConfig
    name: str

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def adapter_dir(self) -> Path:
        return self.dir.adapter

    @property
    def adapter_config(self) -> dict[str, Any]:
        return json.loads(self.dir.adapter_config_file.read_text())

    def group_choice(self, group: str) -> str | None:
        """The option the run picked for a config group (``data`` -> ``json_extract``), if recorded."""
        return self.dir.group_choice(group)


def run_dirs(value: Any) -> list[str]:
    """``run_dir=DIR`` or ``run_dir=[A,B,C]`` as a list of strings."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None or value == "" or value == []:
        raise RunDirError("run_dir is missing: pass run_dir=DIR (a training run directory) or run_dir=[A,B,...]")
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory; one clear error when it is not a finished run with an adapter."""
    run = RunDir(Path(path).expanduser().resolve())
    if not run.path.is_dir():
        raise RunDirError(f"run_dir={path}: no such directory")
    if not run.config_file.is_file():
        config = run.config_file.relative_to(run.path)
        raise RunDirError(f"run_dir={path}: no {config} (not a lora_exp.train run directory)")
    if not run.has_adapter() and (run.has_model() or run.config().get("method") == "full"):
        raise RunDirError(
            f"run_dir={path} is a full fine-tune (method=full): it has no adapter; its trained model is the plain "
            f"HF folder {run.model} (transformers' from_pretrained loads it, or model.path={run.model})"
        )
    if not run.has_adapter():
        raise RunDirError(
            f"run_dir={path}: no {ADAPTER_DIR}/adapter_config.json (the run did not finish; see its metrics.json)"
        )
    return Run(dir=run, cfg=run.config(), name=name or adapter_name(run.path))


def load_runs(value: Any, names: Any = None) -> list[Run]:
    """Load every run directory of ``run_dir=``; adapter names are unique (``names=`` overrides them)."""
    dirs = run_dirs(value)
    if names is not None:
        names = run_dirs(names)
        if len(names) != len(dirs):
            raise RunDirError(f"names={names}: {len(names)} names for {len(dirs)} run directories")
    runs = [load_run(d, names[i] if names else None) for i, d in enumerate(dirs)]
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen or run.name == "base":
            seen[run.name] = seen.get(run.name, 1) + 1
            run.name = f"{run.name}_{seen[run.name]}"
        seen.setdefault(run.name, 1)
    return runs


def adapter_name(path: Path) -> str:
    """A PEFT adapter name from a run directory's name (PEFT names may not contain dots)."""
    name = re.sub(r"[^0-9A-Za-z_-]+", "_", Path(path).resolve().name).strip("_")
    return name or "adapter"


def base_folder(run: Run) -> str:
    """The base model the adapter was trained on: its recorded folder, else rebuilt from the run's config."""
    from lora_exp.model.load import resolve_model_folder

    recorded = run.adapter_config.get("base_model_name_or_path")
    if recorded and (Path(recorded) / "config.json").is_file():
        return recorded
    return resolve_model_folder(run.cfg.model)


def check_same_base(runs: Sequence[Run]) -> str:
    """All adapters must share one base model to be swapped on it; return that base's folder."""
    folders = [base_folder(r) for r in runs]
    differ = [f"{r.path} -> {f}" for r, f in zip(runs, folders) if f != folders[0]]
    if differ:
        raise RunDirError(
            f"run_dir: adapters on different base models cannot share one base; {runs[0].path} -> {folders[0]}, "
            + ", ".join(differ)
        )
    return folders[0]


def quant_name(cfg: DictConfig) -> str | None:
    """The run's ``quant.mode`` (``nf4``, ``int8``), or None for a full-precision base."""
    quant = cfg.get("quant")
    mode = quant.get("mode") if OmegaConf.is_dict(quant) else quant
    return None if mode in (None, "none", False) else str(mode)


def load_base(run: Run, folder: str, dtype: str | None = None):
    """Load the frozen base as training did, in eval mode.

    ``model.dtype`` and the run's ``quant`` (with PEFT's k-bit preparation) apply, so the numbers
    match the run's own.

    Args:
        run: the run whose config says how the base was loaded.
        folder: the base model folder (see ``base_folder``).
        dtype: override of ``model.dtype`` (``export`` merges in float32).
    """
    from transformers.utils import logging as hf_logging

    from lora_exp.model import load as models

    hf_logging.disable_progress_bar()  # a bar per weight load is noise next to streamed text and tables
    # activation checkpointing only slows inference down
    model_cfg = OmegaConf.merge(run.cfg.model, {"gradient_checkpointing": False})
    if dtype is not None:
        model_cfg.dtype = dtype
    if str(model_cfg.get("dtype")) == "auto":  # a run whose saved config was not resolved: this device's choice
        from lora_exp.model.precision import resolve_dtype

        model_cfg.dtype = resolve_dtype("auto")
    base = models.load_base_model(model_cfg, folder, run.cfg.get("quant"))
    base.eval()
    return base


def attach_adapters(base, runs: Sequence[Run]):
    """Load each run's adapter onto ``base`` as a named PEFT adapter; the first one is active.

    The base weights are loaded once; ``model.set_adapter(name)`` switches between adapters and
    ``with model.disable_adapter():`` gives the base model alone.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(runs[0].adapter_dir), adapter_name=runs[0].name)
    for run in runs[1:]:
        model.load_adapter(str(run.adapter_dir), adapter_name=run.name)
    model.set_adapter(runs[0].name)
    model.eval()
    return model


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quote_free_text(argv: list[str], keys: Sequence[str]) -> list[str]:
    """Quote free-text values (``prompt=Hello, world``) so Hydra's override grammar takes them verbatim.

    Unquoted, Hydra reads commas as a sweep, brackets as a list and ``${`` as an interpolation.
    Values the user already quoted for Hydra are left as they are.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            # Hydra unescapes backslashes only where they precede a quote (or end the string)
            value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
            value = value.replace("${", "\\${")
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def quiet_lightning() -> None:
    """Lightning's info lines (GPU available, ...) go through Hydra's logging once, not twice."""
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
        logging.getLogger(name).setLevel(logging.WARNING)
