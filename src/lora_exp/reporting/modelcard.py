"""A Hugging Face model card for one run's adapter: ``RUN/adapter/README.md``.

YAML front matter (``huggingface_hub.ModelCardData``: base model, ``library_name: peft``, tags,
license when the base model's is known), then the base model, the data fingerprint, the LoRA
config as PEFT saved it (``adapter_config.json``), the metrics (with the mean and 95% CI over the
seeds of the run's configuration when the run belongs to the sweeps given), compute, the command
that reproduces the run and a BibTeX entry.

A README.md already there is replaced only when this module wrote it (its marker line) or when it
is the blank template PEFT's ``save_pretrained`` leaves; one a user wrote is never touched.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from lora_exp import metrics as M
from lora_exp.errors import RunDirError
from lora_exp.reporting.collect import (
    aggregate,
    config_columns,
    config_label,
    group_runs,
    load_runs,
    number,
    seed_values,
)
from lora_exp.reporting.tables import fmt, md_table

CARD_FILE = "README.md"
MARKER = "<!-- lora-exp model card: written by python -m lora_exp.paper --model-card; rewritten on each call -->"
TITLE = "lora-exp: LoRA / QLoRA fine-tuning experiments"
# licenses of the base models lora-exp ships configs for (hub id prefix -> SPDX / hub license id)
LICENSES = {
    "meta-llama/Llama-3.1": "llama3.1",
    "meta-llama/Meta-Llama-3.1": "llama3.1",
    "HuggingFaceTB/SmolLM2": "apache-2.0",
}
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "bias",
               "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save", "task_type",
               "peft_type")  # fmt: skip
PEFT_TEMPLATE_LINES = ("### Framework versions", "- PEFT ")  # what PEFT appends to the hub's blank template


class ModelCardError(RunDirError):
    """The run has no adapter to describe, or its adapter folder holds a README.md a user wrote."""


def write_model_card(run_dir: Path, sweep_dirs: list[Path] | None = None) -> Path:
    """Write ``run_dir/adapter/README.md``; return its path.

    Args:
        run_dir: a completed LoRA run directory.
        sweep_dirs: sweeps the run belongs to; its configuration's seeds there give the CIs.
    """
    from lora_exp.runs.rundir import RunDir, write_text

    run = RunDir(Path(run_dir).expanduser().resolve())
    if not run.has_adapter():
        raise ModelCardError(f"--model-card {run.path}: no {run.adapter_config_file.relative_to(run.path)} there")
    if run.status() != M.STATUS_COMPLETED:
        raise ModelCardError(f"--model-card {run.path}: the run is {run.status() or 'unreadable'}, not completed")
    path = run.adapter / CARD_FILE
    if path.exists() and not replaceable(path.read_text(errors="replace")):
        raise ModelCardError(
            f"{path} was not written by lora-exp (no marker line) nor left blank by PEFT; it is never replaced: "
            "move it away to write the model card"
        )
    write_text(path, card_text(run, _sweep_stats(run.path, sweep_dirs)))
    print(f"[lora-exp] paper: model card -> {path}", flush=True)
    return path


def replaceable(text: str) -> bool:
    """Whether a README.md is ours, or the hub's blank template as PEFT's ``save_pretrained`` left it."""
    from huggingface_hub import ModelCard, ModelCardData

    if MARKER in text:
        return True
    body = ModelCard(text, ignore_metadata_errors=True).text
    kept = [line for line in body.splitlines() if not line.startswith(PEFT_TEMPLATE_LINES)]
    blank = ModelCard.from_template(ModelCardData()).text
    return "\n".join(kept).strip() == blank.strip()


def _sweep_stats(run_path: Path, sweep_dirs: list[Path] | None) -> dict[str, Any] | None:
    """The run's configuration in the sweeps: its label, seeds and per-metric aggregates; None if absent."""
    if not sweep_dirs:
        return None
    runs = load_runs([Path(d).expanduser().resolve() for d in sweep_dirs])
    cols = config_columns(runs)
    for members in group_runs(runs, cols):
        if any(r.path == run_path for r in members):
            keys = [m for m in M.REPORT_METRICS if seed_values(members, m)[1]]
            return {
                "label": config_label(members[0].config, cols),
                "seeds": [r.seed for r in members if r.ok],
                "stats": {m: aggregate(seed_values(members, m)[1]) for m in keys},
            }
    return None


def front_matter(cfg, hub_id: str | None) -> str:
    """The YAML metadata block (``huggingface_hub.ModelCardData``), between ``---`` lines."""
    from huggingface_hub import ModelCardData

    license_id = next((v for k, v in LICENSES.items() if hub_id and hub_id.startswith(k)), None)
    tags = ["lora", "peft", "lora-exp"] + ([f"base_model:adapter:{hub_id}"] if hub_id else [])
    data = ModelCardData(
        base_model=hub_id, library_name="peft", license=license_id, tags=tags, pipeline_tag="text-generation"
    )
    return f"---\n{data.to_yaml()}\n---\n"


def card_text(run, sweep: dict[str, Any] | None) -> str:
    """The whole card: front matter, then one section per subject."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(run.config(), resolve=False) if run.config_file.is_file() else {}
    model = cfg.get("model") or {}
    hub_id = model.get("hub_id") if isinstance(model.get("hub_id"), str) else None
    record, info = run.metrics(), run.run_json()
    parts = [
        front_matter(cfg, hub_id),
        f"# LoRA adapter of {hub_id or model.get('name') or 'its base model'}"
        + (f" ({sweep['label']})" if sweep else ""),
        MARKER,
        "",
        f"Trained with lora-exp from run directory `{run.path}`"
        + (f", configuration {sweep['label']} of a sweep." if sweep else "."),
        *_base_section(model, hub_id, info),
        *_data_section(run, record),
        *_lora_section(run),
        *_metrics_section(record, sweep),
        *_compute_section(record),
        *_reproduce_section(run, info),
        *_bibtex_section(run, info),
    ]
    return "\n".join(parts) + "\n"


def _base_section(model: dict, hub_id: str | None, info: dict) -> list[str]:
    lines = ["", "## Base model", ""]
    if hub_id:
        lines.append(f"[`{hub_id}`](https://huggingface.co/{hub_id}) (lora-exp config `model={model.get('name')}`).")
    else:
        lines.append(f"`model={model.get('name')}` ({model.get('source') or 'local'}; not a hub model).")
    fingerprint = info.get("model") if isinstance(info.get("model"), dict) else None
    if fingerprint and fingerprint.get("sha256"):
        lines.append(f"Weights sha256 (as loaded): `{fingerprint['sha256']}`.")
    return lines


def _data_section(run, record: dict) -> list[str]:
    rows = [[k, str(record[k])] for k in (M.DATA_FORMAT, M.DATA_TRAIN_EXAMPLES, M.DATA_VAL_EXAMPLES,
                                          M.DATA_TRUNCATED, M.DATA_FINGERPRINT) if k in record]  # fmt: skip
    lines = ["", "## Data", "", f"Data set: `data={run.group_choice('data') or '?'}`."]
    if rows:
        lines += ["", md_table(["key", "value"], rows)]
    lines.append(
        "\nThe fingerprint hashes the examples, the chat template, the tokenizer and the settings that change tokens."
    )
    return lines


def _lora_section(run) -> list[str]:
    config = json.loads(run.adapter_config_file.read_text())
    rows = [[k, f"`{json.dumps(config[k])}`"] for k in LORA_FIELDS if k in config and config[k] not in (None, {}, [])]
    return [
        "",
        "## LoRA configuration",
        "",
        "From `adapter_config.json` (PEFT):",
        "",
        md_table(["field", "value"], rows),
    ]


def _metrics_section(record: dict, sweep: dict[str, Any] | None) -> list[str]:
    keys = [k for k in M.REPORT_METRICS if number(record.get(k)) is not None and not k.startswith(M.BEST_PREFIX)]
    lines = ["", "## Metrics", ""]
    if sweep:
        n = len(sweep["seeds"])
        lines.append(f"This run, and its configuration over {n} seeds ({', '.join(map(str, sweep['seeds']))}): "
                     "mean ± sample std [95% t-interval].")  # fmt: skip
        header = ["metric", "this run", f"configuration (n={n})"]
    else:
        lines.append("This run only (one seed: CIs over seeds need the sweep directories holding its configuration).")
        header = ["metric", "this run"]
    rows = []
    for k in keys:
        row = [k, fmt(record[k], k)]
        if sweep:
            s = sweep["stats"].get(k)
            row.append(_mean_ci(s, k) if s else "-")
        rows.append(row)
    return [*lines, "", md_table(header, rows)]


def _mean_ci(s: dict[str, float], key: str) -> str:
    text = fmt(s["mean"], key)
    if s["n"] > 1:
        text += f" ± {fmt(s['std'], key)} [{fmt(s['ci95_lo'], key)}, {fmt(s['ci95_hi'], key)}]"
    return text


def _compute_section(record: dict) -> list[str]:
    rows = [
        [k, f"{record[k]:.4g}"] for k in sorted(record) if k.startswith("compute/") and number(record[k]) is not None
    ]
    if not rows:
        return []
    return ["", "## Compute", "", "Training steps of this run (analytic FLOPs; wall time of the training loop):", "",
            md_table(["key", "value"], rows)]  # fmt: skip


def _reproduce_section(run, info: dict) -> list[str]:
    lines = ["", "## Reproduce", "", "```bash", f"python -m lora_exp.reproduce {shlex.quote(str(run.path))}", "```"]
    if info.get("command"):
        lines += ["", "The original command:", "", "```bash", shlex.join(map(str, info["command"])), "```"]
    git = info.get("git") or {}
    if git.get("commit"):
        lines.append(
            f"\nlora-exp git commit `{git['commit']}`" + (" (with uncommitted changes)." if git.get("dirty") else ".")
        )
    return lines


def bibtex(run_name: str, year: str, commit: str | None) -> str:
    """A BibTeX ``@software`` entry for lora-exp naming this adapter's run."""
    from lora_exp import __version__

    note = f"Adapter of run {run_name}" + (f", git commit {commit[:12]}" if commit else "")
    return "\n".join([
        "@software{lora_exp,",
        "  author = {{lora-exp developers}},",
        f"  title = {{{TITLE}}},",
        f"  version = {{{__version__}}},",
        f"  year = {{{year}}},",
        f"  note = {{{note}}}",
        "}",
    ])  # fmt: skip


def _bibtex_section(run, info: dict) -> list[str]:
    import time

    started = str(info.get("started") or "")
    year = started[:4] if re.match(r"\d{4}", started) else time.strftime("%Y")
    entry = bibtex(run.path.name, year, (info.get("git") or {}).get("commit"))
    return ["", "## Citation", "", "```bibtex", entry, "```"]
