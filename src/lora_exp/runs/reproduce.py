"""Re-running a finished run from its recorded config, then comparing metrics and adapter (see lora_exp.reproduce)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lora_exp import metrics as M
from lora_exp.errors import RunDirError
from lora_exp.runs.provenance import adapter_hash, environment_diff
from lora_exp.runs.rundir import ADAPTER_DIR, RUN_FILE, RunDir, read_metrics, run_status

GPU_RTOL = 1e-3
# measured, not computed: clocks and rates vary run to run; where a run lives is not a result
_NOT_COMPARED_PREFIXES = ("time/", "wandb/")
_NOT_COMPARED_SUFFIXES = ("tokens_per_s", "time_s", "_s")
# measured (clock, memory) or how a value was chosen (a re-run from the resolved config has no
# `auto` keys left), not results
_NOT_COMPARED = {M.STATUS, "pid", M.ERROR, M.COMPUTE_DEVICE_HOURS, M.COMPUTE_PEAK_MEM_MB, "precision/auto_keys"}


def comparable(key: str, value: Any) -> bool:
    """Whether a metrics.json entry is a result that a repeat must reproduce."""
    if key in _NOT_COMPARED or key.startswith(_NOT_COMPARED_PREFIXES) or key.endswith(_NOT_COMPARED_SUFFIXES):
        return False
    return isinstance(value, (int, float, str, bool, list)) or value is None


def compare_metrics(old: dict[str, Any], new: dict[str, Any], rtol: float) -> list[tuple[str, Any, Any, bool]]:
    """(key, original, reproduced, matches) for every comparable key of either record."""
    rows = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if not comparable(key, a if key in old else b):
            continue
        rows.append((key, a, b, _close(a, b, rtol)))
    return rows


def _close(a: Any, b: Any, rtol: float) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isnan(a) and math.isnan(b):
            return True
        return a == b if rtol == 0 else math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-3)
    return a == b


def compare_adapters(old_dir: Path, new_dir: Path, rtol: float) -> tuple[bool, str]:
    """(matches, description): file hashes first; within ``rtol`` tensor by tensor when a tolerance is set."""
    h_old, h_new = adapter_hash(old_dir), adapter_hash(new_dir)
    recorded = RunDir(old_dir).run_json().get("adapter_sha256")
    if h_new is None:
        return False, "adapter missing (reproduced)"
    if h_old is None:  # the original adapter was deleted: run.json still says what it was
        if not recorded:
            return False, "adapter missing (original), and run.json records no adapter_sha256"
        if recorded == h_new:
            return True, f"identical to the sha256 run.json records (original adapter/ deleted; {h_new[:16]})"
        return False, f"differs from the sha256 run.json records: {recorded[:16]} vs {h_new[:16]} (adapter/ deleted)"
    if h_old == h_new:
        return True, f"identical (sha256 {h_old[:16]})"
    if rtol == 0:
        return False, f"differs: sha256 {h_old[:16]} vs {h_new[:16]}"
    from safetensors.torch import load_file

    a = load_file(str(old_dir / ADAPTER_DIR / "adapter_model.safetensors"))
    b = load_file(str(new_dir / ADAPTER_DIR / "adapter_model.safetensors"))
    if a.keys() != b.keys():
        return False, "differs: different tensor names"
    worst = 0.0
    for k in a:
        scale = max(a[k].float().abs().max().item(), 1e-12)
        worst = max(worst, (a[k].float() - b[k].float()).abs().max().item() / scale)
    return worst <= rtol, f"bytes differ; largest relative difference {worst:.2e} (tolerance {rtol:g})"


def _used_gpu(run_dir: Path) -> bool:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool((data.get("hardware") or {}).get("gpu_count"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.8g}"
    text = "-" if value is None else str(value)
    return text if len(text) <= 16 else text[:13] + "..."


def reproduce(run_dir: Path, out: Path | None, rtol: float | None, extra: list[str]) -> int:
    """Re-run ``run_dir`` into ``out``, print the comparison, return the exit status."""
    run_dir = run_dir.resolve()
    saved = RunDir(run_dir).config_file
    if not saved.is_file():
        raise RunDirError(f"{run_dir}: no {saved.relative_to(run_dir)}; not a lora_exp.train run directory")
    status = run_status(run_dir)
    if status != M.STATUS_COMPLETED:
        raise RunDirError(f"{run_dir}: status is {status!r}; only completed runs can be reproduced")
    gpu = _used_gpu(run_dir)
    rtol = (GPU_RTOL if gpu else 0.0) if rtol is None else rtol
    out = (out or run_dir.with_name(f"{run_dir.name}.reproduce-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"--out {out} exists and is not empty")

    recorded = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
    if recorded.get("config"):  # the config the run started with; .hydra/ is rewritten by a resume
        from omegaconf import OmegaConf

        saved = out / ".reproduce" / "config.yaml"
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(OmegaConf.to_yaml(OmegaConf.create(recorded["config"])))
    for diff in environment_diff(recorded) if recorded else ["run.json missing: the environment cannot be checked"]:
        print(f"warning: environment differs from run.json: {diff}", file=sys.stderr)

    command = [
        sys.executable,
        "-m",
        "lora_exp.train",
        f"--config-path={saved.parent}",
        "--config-name=config",
        f"hydra.run.dir={out}",
        "resume=false",
        *extra,
    ]
    print(f"reproducing {run_dir}\n  into {out}\n  {' '.join(command[1:])}", flush=True)
    proc = subprocess.run(command, env={**os.environ, "HYDRA_FULL_ERROR": os.environ.get("HYDRA_FULL_ERROR", "0")})
    if proc.returncode != 0:
        print(f"reproduce: the re-run failed with exit status {proc.returncode}", file=sys.stderr)
        return 1

    rows = compare_metrics(read_metrics(run_dir), read_metrics(out), rtol)
    adapter_ok, adapter_note = compare_adapters(run_dir, out, rtol)
    tolerance = "exact (CPU)" if rtol == 0 else f"relative {rtol:g}" + (" (GPU run)" if gpu else "")
    width = max((len(r[0]) for r in rows), default=10)
    print(f"\n{'metric':<{width}}  {'original':>16}  {'reproduced':>16}  {'difference':>12}")
    for key, a, b, ok in rows:
        diff = b - a if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)) else ""
        mark = "" if ok else "  <- differs"
        print(f"{key:<{width}}  {_fmt(a):>16}  {_fmt(b):>16}  {_fmt(diff):>12}{mark}")
    mismatched = [r[0] for r in rows if not r[3]]
    print(f"\nadapter: {adapter_note}")
    print(f"tolerance: {tolerance}")
    ok = adapter_ok and not mismatched
    report = {
        "original": str(run_dir),
        "reproduced": str(out),
        "tolerance": tolerance,
        "adapter_matches": adapter_ok,
        "adapter": adapter_note,
        "mismatched_metrics": mismatched,
        "matches": ok,
    }
    (out / "reproduce.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        "REPRODUCED: metrics and adapter match"
        if ok
        else f"NOT REPRODUCED: {len(mismatched)} metric(s) differ" + ("" if adapter_ok else "; adapter differs")
    )
    return 0 if ok else 1
