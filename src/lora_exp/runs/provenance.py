"""Provenance: what produced a run (``run.json``, ``pip-freeze.txt``) and the hashes that identify it.

``run.json`` says what produced the run: command and overrides, seed, git state, package versions
(a full ``pip-freeze.txt`` lies beside it), hardware, and hashes of the data, the base model and
the initial adapter. ``python -m lora_exp.reproduce`` compares it with the environment it runs in.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lora_exp.runs.rundir import FREEZE_FILE, RUN_FILE, sha256_file, write_json, write_text
from lora_exp.runs.secrets import redact_argv

# the packages whose versions change numbers; run.json names them, pip-freeze.txt has everything
KEY_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "lightning",
    "hydra-core",
    "omegaconf",
    "bitsandbytes",
    "wandb",
    "safetensors",
    "tokenizers",
    "numpy",
)


# ----------------------------------------------------------------------------------------- hashes


def adapter_hash(run_dir: Path) -> str | None:
    """SHA-256 of the saved adapter weights file; None when there is none."""
    from lora_exp.runs.rundir import RunDir

    return RunDir(run_dir).adapter_sha256()


def state_hash(named_tensors) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of tensors, in name order: an in-memory weights hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda kv: kv[0]):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(datamodule) -> str:
    """The data module's own ``fingerprint`` when it has one, else a hash of the tokenized rows."""
    fingerprint = getattr(datamodule, "fingerprint", None)
    if callable(fingerprint):
        fingerprint = fingerprint()
    if fingerprint:
        return str(fingerprint)
    digest = hashlib.sha256()
    for split in ("train_rows", "val_rows"):
        for row in getattr(datamodule, split, []) or []:
            digest.update(json.dumps([row.get("input_ids"), row.get("labels")]).encode())
        digest.update(b"|")
    return digest.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".gguf", ".pt")


def model_fingerprint(folder_or_id: str, model_cfg=None) -> dict[str, Any]:
    """File hashes of a local model folder, or the hub id and revision.

    Hashing ~540 MB costs about a second, so hashes are cached per (path, size, mtime) under the
    lora-exp cache: an unchanged folder is never hashed twice.
    """
    folder = Path(folder_or_id)
    if not folder.is_dir():
        revision = (model_cfg.get("revision") if model_cfg is not None else None) or _hub_revision(folder_or_id)
        return {"hub_id": folder_or_id, "revision": revision}
    from lora_exp.model.load import cache_root

    cache_file = cache_root() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    files, changed = {}, False
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            cache[key], changed = sha256_file(path), True
        files[path.name] = cache[key]
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache_file, cache)
        except OSError:
            pass
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"path": str(folder), "sha256": combined, "files": files}


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the locally cached snapshot of a hub model, when there is one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
        return Path(path).parent.name if isinstance(path, str) else None
    except Exception:
        return None


# -------------------------------------------------------------------------------------- environment


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def pip_freeze() -> str:
    """``name==version`` of every installed distribution (what ``pip freeze`` lists, without running pip)."""
    from importlib import metadata

    lines = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            lines.add(f"{name}=={dist.version}")
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["gpu_count"])]
        info["cuda"] = torch.version.cuda
    except Exception:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """Commit, dirty flag and a hash of the uncommitted diff of the lora-exp source tree."""
    repo = repo or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=20, check=True)
            return out.stdout.decode(errors="replace")
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    status = git("status", "--porcelain", "--untracked-files=no") or ""
    diff = git("diff", "HEAD", "--binary") or ""
    return {
        "commit": commit.strip(),
        "dirty": bool(status.strip()),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def command_line() -> list[str]:
    """The command as the user typed it: ``python -m lora_exp.train ...`` rather than a script path."""
    argv = list(sys.argv) or [""]
    script = Path(argv[0])
    if script.suffix == ".py" and script.parent.name == "lora_exp":
        return ["python", "-m", f"lora_exp.{script.stem}", *argv[1:]]
    return argv


def hydra_overrides() -> dict[str, list[str]]:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            return {"task": list(hc.overrides.task), "hydra": list(hc.overrides.hydra)}
    except Exception:
        pass
    return {"task": [], "hydra": []}


def environment() -> dict[str, Any]:
    """The parts of run.json that describe where a run ran (compared by ``reproduce``)."""
    return {"packages": package_versions(), "hardware": hardware(), "git": git_state()}


def write_run_json(run_dir: Path, cfg, fingerprints: dict[str, Any]) -> dict[str, Any]:
    """Write ``run.json`` and ``pip-freeze.txt``; a resumed run keeps the original and appends itself.

    Secrets never enter: the config was checked for secret-looking keys, the command line is
    redacted, and no environment variable is recorded.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    overrides = hydra_overrides()
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    command = redact_argv(command_line())
    if path.is_file() and bool(cfg.get("resume")):
        data = json.loads(path.read_text())
        data.setdefault("resumed", []).append(
            {"time": now, "command": command, "environment_matches": environment_diff(data) == []}
        )
        write_json(path, data)
        return data
    data = {
        "command": command,
        "module": "lora_exp.train",
        "overrides": redact_argv(overrides["task"]),
        "hydra_overrides": redact_argv(overrides["hydra"]),
        "cwd": os.getcwd(),
        "started": now,
        "seed": cfg.get("seed"),
        # the composed config, unresolved: what `reproduce` re-runs (a later resume rewrites .hydra/)
        "config": _unresolved(cfg),
        **environment(),
        **fingerprints,
    }
    write_text(run_dir / FREEZE_FILE, pip_freeze())
    write_json(path, data)
    return data


def _unresolved(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)


def update_run_json(run_dir: Path, **values: Any) -> None:
    path = Path(run_dir) / RUN_FILE
    if path.is_file():
        write_json(path, {**json.loads(path.read_text()), **values})


def environment_diff(recorded: dict[str, Any]) -> list[str]:
    """Human-readable differences between a run.json's environment and this one."""
    now = environment()
    diffs = []
    for name, version in (recorded.get("packages") or {}).items():
        if now["packages"].get(name, version) != version:
            diffs.append(f"{name} {version} -> {now['packages'].get(name)}")
    for key in ("cpu", "gpus", "torch_threads"):
        was, is_ = (recorded.get("hardware") or {}).get(key), now["hardware"].get(key)
        if was is not None and was != is_:
            diffs.append(f"hardware {key}: {was} -> {is_}")
    git_was, git_now = recorded.get("git") or {}, now["git"]
    if git_was.get("commit") and git_was.get("commit") != git_now.get("commit"):
        diffs.append(f"git commit {str(git_was['commit'])[:10]} -> {str(git_now.get('commit'))[:10]}")
    elif git_was.get("diff_sha256") != git_now.get("diff_sha256"):
        diffs.append("uncommitted changes differ from the recorded run's (git diff hash)")
    return diffs
