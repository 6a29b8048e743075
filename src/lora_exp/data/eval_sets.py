"""Named evaluation sets beside the held-out split: ``data.eval_sets`` maps a name to a source.

Each set is scored by the same validation loop as the held-out split (``LoraModule``: loss,
perplexity, token accuracy, exact match) and recorded as ``val/<name>/loss``, ``val/<name>/ppl``, ...
(``base/val/<name>/...`` for the base model; names from ``lora_exp.metrics.eval_set``). The
held-out split stays ``val/*``: it is what ``optimized_metric`` and checkpoint selection read, unless
``optimized_metric`` names an eval-set key itself.

Sources (one of ``path``, ``task``, ``probe`` per set)::

    data.eval_sets:
      other: {path: other.jsonl, format: auto, fields: {prompt: question}, num: 200}
      fresh: {task: json_extract, data_seed: 1, num: 128}
      probe: {probe: general_text}

``path``: every record of a local file (read as ``data=jsonl`` reads files; ``num`` keeps the first
N; ``fields`` defaults to ``data.fields``). ``task``: the held-out part of a built-in task
(``data_seed`` 0, the default, reproduces ``data=json_extract``'s own held-out split). ``probe``: a
built-in probe (``lora_exp.data.probe``; ``general_text`` measures drift from the base model).
Every set is rendered with the run's tokenizer, chat template and ``data.max_seq_len``, and file and
task sets go through the tokenized-data cache (``lora_exp.data.tokenized``) as the main splits do.
"""

from __future__ import annotations

import re
from typing import Any

from lora_exp.data import formats, sources, tasks, tokenized
from lora_exp.data.templating import Renderer
from lora_exp.errors import DataError

KINDS = ("path", "task", "probe")
KEYS = {"path": {"format", "fields", "num"}, "task": {"data_seed", "num"}, "probe": set()}
NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # one segment of a metric key, and a torch module name
DEFAULT_TASK_SIZE = 128


def specs(eval_sets: Any) -> dict[str, dict]:
    """``data.eval_sets`` as plain ``{name: spec}``, every problem named by its key (one ``DataError``)."""
    from omegaconf import DictConfig, OmegaConf

    if eval_sets is None:
        return {}
    if isinstance(eval_sets, DictConfig):
        eval_sets = OmegaConf.to_container(eval_sets, resolve=True)
    if not isinstance(eval_sets, dict):
        raise DataError(f"data.eval_sets={eval_sets!r}: expected a mapping name -> {{path|task|probe: ...}}")
    problems = [p for name, spec in eval_sets.items() for p in _problems(str(name), spec)]
    if problems:
        raise DataError("; ".join(problems))
    return {str(k): dict(v) for k, v in eval_sets.items()}


def _problems(name: str, spec: Any) -> list[str]:
    from lora_exp.data.probe import PROBES

    key = f"data.eval_sets.{name}"
    if not NAME.match(name):
        return [f"{key}: a set name may hold only letters, digits, _ and - (it becomes val/{name}/loss)"]
    if not isinstance(spec, dict):
        return [f"{key}={spec!r}: expected {{path: FILE}}, {{task: NAME}} or {{probe: NAME}}"]
    kinds = [k for k in KINDS if spec.get(k) is not None]
    if len(kinds) != 1:
        return [f"{key}: give exactly one of path, task, probe (got {', '.join(kinds) or 'none'})"]
    kind = kinds[0]
    problems = [f"{key}.{k}: unknown key for a {kind} set" for k in spec if k not in KEYS[kind] | {kind}]
    if kind == "task" and spec["task"] not in tasks.TASKS:
        problems.append(f"{key}.task={spec['task']!r}: unknown task; expected one of {', '.join(tasks.TASKS)}")
    if kind == "probe" and spec["probe"] not in PROBES:
        problems.append(f"{key}.probe={spec['probe']!r}: unknown probe; expected one of {', '.join(PROBES)}")
    if kind == "path" and spec.get("format", "auto") not in formats.FORMATS:
        problems.append(
            f"{key}.format={spec['format']!r}: unknown format; expected one of {', '.join(formats.FORMATS)}"
        )
    num = spec.get("num")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        problems.append(f"{key}.num={num!r}: expected a count >= 1")
    return problems


def kind_of(spec: dict) -> str:
    return next(k for k in KINDS if spec.get(k) is not None)


def load(name: str, spec: dict, data_cfg, renderer: Renderer) -> tokenized.Split:
    """The token rows of a file or task set (probes are built by ``lora_exp.data.probe``, with the model)."""
    kind = kind_of(spec)
    label = f"data.eval_sets.{name}"
    if kind == "task":
        n = int(spec.get("num") or DEFAULT_TASK_SIZE)
        _, held_out = tasks.generate(spec["task"], 0, n, int(spec.get("data_seed") or 0))
        where = f"eval set {name} (task {spec['task']})"
        records = [sources.Record(r, f"{where} {i}", where) for i, r in enumerate(held_out)]
        fmt, fields = "chat", formats.field_names(None)
    else:
        records = sources.read_file(spec["path"], f"{label}.path")
        if spec.get("num"):
            records = records[: int(spec["num"])]
        fields = formats.field_names(spec.get("fields", data_cfg.get("fields")))
        fmt = formats.resolve(spec.get("format", "auto"), records, fields)
    examples = formats.convert_all(records, fmt, fields)
    settings = tokenized.token_settings(renderer, fmt, fields)
    return tokenized.tokenize_split(
        renderer, examples, records, f"eval set {name}", settings, cache=bool(data_cfg.get("cache", True))
    )
