"""``manifest.json`` of a paper folder: what it was built from, and the check that it still is.

The manifest holds the sha256 of every input file of every run (``metrics.json``, ``run.json``,
``.hydra/config.yaml``, ``.hydra/overrides.yaml``, ``history.jsonl`` behind the loss curves, and
a tuned sweep's ``tuning.json``), the sha256 of every file the paper wrote, the command line, the
lora-exp version and the git commit. :func:`check` re-hashes all of it: an edited or missing
input, a run gone or a new run in the sweep, or an output edited by hand is a problem.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_exp.errors import UserError
from lora_exp.runs.provenance import git_state, sha256_file
from lora_exp.runs.rundir import HISTORY_FILE, METRICS_FILE, RUN_FILE, RunDir

MANIFEST_FILE = "manifest.json"
FORMAT = 1
TUNING_FILE = "tuning.json"  # written by the tuned sweeper into its sweep directory


class ManifestError(UserError):
    """No manifest to check, or one this version cannot read."""


def run_inputs(run: RunDir) -> dict[str, Path]:
    """The files of a run that feed the paper, by their path inside the run directory (those present)."""
    files = {
        METRICS_FILE: run.metrics_file,
        RUN_FILE: run.run_file,
        str(run.config_file.relative_to(run.path)): run.config_file,
        str(run.overrides_file.relative_to(run.path)): run.overrides_file,
        HISTORY_FILE: run.history_file,
    }
    return {name: path for name, path in files.items() if path.is_file()}


def tuning_files(sweep_dirs: list[Path], run_dirs: list[Path]) -> list[Path]:
    """``tuning.json`` in a sweep directory or any folder between it and a run (a tuned sweep's record)."""
    folders = set(sweep_dirs)
    for run in run_dirs:
        for parent in run.parents:
            if any(parent == s or s in parent.parents for s in sweep_dirs):
                folders.add(parent)
    return sorted(f / TUNING_FILE for f in folders if (f / TUNING_FILE).is_file())


def output_hashes(out: Path, skip: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file under ``out`` (relative POSIX paths), except the names in ``skip``."""
    return {
        p.relative_to(out).as_posix(): sha256_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).as_posix() not in skip
    }


def build(sweep_dirs: list[Path], runs, labels: dict[Path, str], command: list[str], options: dict) -> dict[str, Any]:
    """The manifest's input side: every run's files hashed, with its configuration and seed to name it.

    ``run_dirs_found`` lists every run directory under the sweeps, also those the report leaves
    out (a tuned sweep's search runs), so that :func:`check` tells a new run from a skipped one.
    """
    from lora_exp import __version__
    from lora_exp.reporting.collect import find_run_dirs

    git = git_state()
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "cwd": str(Path.cwd()),
        "lora_exp_version": __version__,
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "options": options,
        "sweep_dirs": [str(d) for d in sweep_dirs],
        "run_dirs_found": [str(d) for d in find_run_dirs(sweep_dirs)],
        "runs": {
            str(r.path): {
                "configuration": labels.get(r.path, ""),
                "seed": r.seed,
                "status": r.status,
                "files": {name: sha256_file(p) for name, p in run_inputs(RunDir(r.path)).items()},
            }
            for r in runs
        },
        "other_inputs": {str(p): sha256_file(p) for p in tuning_files(sweep_dirs, [r.path for r in runs])},
    }


def write(out: Path, manifest: dict[str, Any], skip: tuple[str, ...]) -> None:
    """Add the outputs' hashes (everything in ``out`` so far) and write ``out/manifest.json``."""
    manifest["outputs"] = output_hashes(out, (*skip, MANIFEST_FILE))
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")


@dataclass
class CheckResult:
    problems: list[str]
    inputs: int
    runs: int
    outputs: int


def load(out: Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (is {out} a folder written by python -m lora_exp.paper?)") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: manifest format {manifest.get('format')!r}, this lora-exp reads {FORMAT}")
    return manifest


def _compare(path: Path, recorded: str, what: str) -> str | None:
    if not path.is_file():
        return f"missing: {path} ({what})"
    if sha256_file(path) != recorded:
        return f"changed: {path} ({what})"
    return None


def check(out: Path) -> CheckResult:
    """Re-hash every input and output in ``out/manifest.json``; each mismatch is one line naming the file."""
    from lora_exp.reporting.collect import ReportError, find_run_dirs

    out = Path(out).expanduser().resolve()
    manifest = load(out)
    problems: list[str] = []
    inputs = 0
    for run_dir, entry in manifest["runs"].items():
        what = f"run {entry.get('configuration') or '?'}, seed {entry.get('seed')}"
        if not Path(run_dir).is_dir():
            problems.append(f"missing run: {run_dir} ({what})")
            continue
        for name, digest in entry["files"].items():
            inputs += 1
            problems += filter(None, [_compare(Path(run_dir) / name, digest, what)])
    for path, digest in manifest.get("other_inputs", {}).items():
        inputs += 1
        problems += filter(None, [_compare(Path(path), digest, "sweep record")])
    try:  # a run added to the sweep since (a new seed, a resumed point) changes the tables too
        present = find_run_dirs([Path(d) for d in manifest["sweep_dirs"] if Path(d).is_dir()])
    except ReportError:
        present = []
    known = set(manifest.get("run_dirs_found", [])) | set(manifest["runs"])
    problems += [f"new run not in the manifest: {d}" for d in present if str(d) not in known]
    for name, digest in manifest.get("outputs", {}).items():
        problems += filter(None, [_compare(out / name, digest, "output, edited after it was generated")])
    return CheckResult(problems, inputs, len(manifest["runs"]), len(manifest.get("outputs", {})))
