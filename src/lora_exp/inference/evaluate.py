"""``python -m lora_exp.evaluate run_dir=DIR [split=val] [data overrides]``: metrics of trained adapters.

Held-out loss, perplexity, token accuracy and exact match of the base model and of each adapter,
measured by the same ``LoraModule`` validation loop, precision and batches as training, so the
run's own validation split reproduces its recorded ``val/loss``. Several run directories
(``run_dir=[A,B,C]``) are loaded as named PEFT adapters onto one base and evaluated side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_exp.config import config_dir

EVAL_FILE = "eval.json"
BASE_ROW = "base"
SKIP_HARNESS_KEYS = ("sample_len", "alias")  # lm-eval bookkeeping, not scores


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate the base model and every adapter of ``cfg.run_dir``; print a table, write eval.json.

    Returns:
        ``{row name: {metric key: value}}``, row ``base`` first when ``cfg.base`` is set.
    """
    from lora_exp.errors import ConfigError
    from lora_exp.inference import session as inference

    if cfg.split not in ("val", "train"):
        raise ConfigError([f"split={cfg.split!r}: expected val or train"])
    runs = inference.load_runs(cfg.run_dir, cfg.names)

    import lightning as L

    from lora_exp import metrics as M
    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.model.load import load_tokenizer
    from lora_exp.runs.rundir import read_metrics, write_json
    from lora_exp.training.module import LoraModule

    first = runs[0]
    folder = inference.check_same_base(runs)
    data_cfg = eval_data_config(first.cfg.data, cfg)
    for run in runs[1:]:
        if eval_data_config(run.cfg.data, cfg) != data_cfg:
            print(f"note: {run.path} was trained on other data; every adapter is evaluated on {first.path}'s")
        if inference.quant_name(run.cfg) != inference.quant_name(first.cfg):
            print(f"note: {run.path} was trained on another quant; the base is loaded as {first.path}'s")

    inference.quiet_lightning()
    tokenizer = load_tokenizer(folder)
    datamodule = InstructionDataModule(data_cfg, tokenizer, first.cfg.seed)
    datamodule.setup("validate")
    if cfg.split == "train":
        datamodule.val_rows = datamodule.train_rows  # the evaluation loop reads val_rows
    n_examples = len(datamodule.val_rows)

    model = inference.attach_adapters(inference.load_base(first, folder), runs)
    module = LoraModule(model, first.cfg.optim, first.cfg.loss.chunk_size)
    precision = cfg.precision or first.cfg.trainer.get("precision") or "32-true"
    if precision == "auto":  # as a run on this device would pick (lora_exp.model.precision)
        from lora_exp.model.precision import choose, detect

        precision = choose(detect(cfg.accelerator)).trainer_precision
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.progress_bar),
    )

    def measure() -> dict[str, float]:
        module.last_val = {}
        trainer.validate(module, datamodule=datamodule, verbose=False)
        return dict(module.last_val)

    rows = per_adapter(model, runs, cfg.base, measure)

    harness = harness_scores(model, tokenizer, runs, cfg) if cfg.harness.tasks else {}
    for name, scores in harness.items():
        rows[name].update(scores)

    title = f"split={cfg.split}: {n_examples} examples of data {data_cfg.get('name')}, precision {precision}"
    print(table(rows, title))
    context = {
        "split": cfg.split,
        "examples": n_examples,
        "data": OmegaConf.to_container(data_cfg, resolve=True),
        "precision": precision,
        "base_model": folder,
    }
    same_as_training = cfg.split == "val" and data_cfg == first.cfg.data
    for run in runs:
        record = {**context, "run_dir": str(run.path), "adapter": run.name, **rows[run.name]}
        if BASE_ROW in rows:
            record.update({M.base(k): v for k, v in rows[BASE_ROW].items()})
        recorded = _read(read_metrics, run.path)
        if same_as_training and eval_data_config(run.cfg.data, cfg) == data_cfg and M.VAL_LOSS in recorded:
            record["recorded/" + M.VAL_LOSS] = recorded[M.VAL_LOSS]
            diff = abs(rows[run.name][M.VAL_LOSS] - recorded[M.VAL_LOSS])
            print(
                f"{run.name}: {M.VAL_LOSS} {rows[run.name][M.VAL_LOSS]:.6f}, recorded in metrics.json "
                f"{recorded[M.VAL_LOSS]:.6f} (|diff| {diff:.1e})"
            )
        if not cfg.out:
            write_json(run.path / EVAL_FILE, record)
            print(f"wrote {run.path / EVAL_FILE}")
    if cfg.out:
        out = Path(cfg.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {**context, "run_dirs": {r.name: str(r.path) for r in runs}, "rows": rows})
        print(f"wrote {out}")
    return rows


def eval_data_config(run_data: DictConfig, cfg: DictConfig) -> DictConfig:
    """The run's data config with the ``data`` overrides typed on this command line applied.

    With ``data=OPTION`` for another option than the run's, that option's config (plus overrides)
    replaces the run's. ``cfg.batch_size`` sets the evaluation batch size.
    """
    overrides = _cli_overrides()
    choice = next((v for k, v in overrides if k in ("data", "+data", "++data")), None)
    if choice is not None and choice != run_data.get("name"):
        data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    else:
        data = OmegaConf.create(OmegaConf.to_container(run_data, resolve=True))
        for key, _ in overrides:
            key = key.lstrip("+~")
            if key.startswith("data."):
                OmegaConf.update(data, key[len("data.") :], OmegaConf.select(cfg, key), force_add=True)
    if cfg.get("data_file"):
        _point_at_file(data, run_data, cfg, {k.lstrip("+~")[len("data.") :] for k, _ in overrides})
    if cfg.get("batch_size"):
        data.eval_batch_size = int(cfg.batch_size)
    return data


def _point_at_file(data: DictConfig, run_data: DictConfig, cfg: DictConfig, typed: set[str]) -> None:
    """``data_file=FILE``: every example of FILE is the evaluated split, rendered as in training.

    The run's sequence length, chat template and prompt supervision carry over unless typed.
    """
    from lora_exp.errors import DataError

    path = Path(cfg.data_file).expanduser()
    if not path.is_file():
        raise DataError(f"data_file={path}: no such file")
    data.train_path = data.val_path = str(path.resolve())
    for key in ("max_seq_len", "chat_template", "train_on_prompt"):
        if key in run_data and key not in typed:
            data[key] = run_data[key]
    if cfg.split == "val" and "num_train" not in typed:
        data.num_train = 1  # the file also stands in as the train split, which is not evaluated


def _cli_overrides() -> list[tuple[str, str]]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [tuple(o.split("=", 1)) for o in HydraConfig.get().overrides.task if "=" in o]


def _read(fn, *args) -> dict[str, Any]:
    try:
        return fn(*args)
    except (OSError, ValueError):
        return {}


def per_adapter(model, runs, base: bool, measure) -> dict[str, dict[str, float]]:
    """``measure()`` with the adapters off (row ``base``, if asked) and then with each run's adapter active."""
    rows: dict[str, dict[str, float]] = {}
    if base:
        with model.disable_adapter():
            rows[BASE_ROW] = measure()
    for run in runs:
        model.set_adapter(run.name)
        rows[run.name] = measure()
    return rows


def table(rows: dict[str, dict[str, float]], title: str) -> str:
    """A plain-text table: one row per model, one column per metric (validation metrics first)."""
    from lora_exp import metrics as M

    keys = [k for k in M.VAL_METRICS if any(k in r for r in rows.values())]
    keys += sorted({k for r in rows.values() for k in r} - set(keys))
    width = max([len(n) for n in rows] + [8]) + 2
    cols = [max(len(k), 10) + 2 for k in keys]
    lines = ["", title, f"{'model':<{width}}" + "".join(f"{k:>{c}}" for k, c in zip(keys, cols))]
    for name, row in rows.items():
        cells = [f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, "-")) for k in keys]
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{c}}" for v, c in zip(cells, cols)))
    return "\n".join(lines) + "\n"


def harness_scores(model, tokenizer, runs, cfg: DictConfig) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness tasks with each adapter really applied (and the base with them off).

    The harness gets the live ``PeftModel`` object (not a model path it would reload without the
    adapter) and the active adapter is switched in place between passes, so it cannot silently
    score the bare base model instead. Task names or local task YAMLs (``harness.include_path``)
    are lm-eval's.
    """
    from lora_exp.errors import UserError

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("harness.tasks needs lm-evaluation-harness: pip install lm-eval") from None
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = cfg.harness.tasks
    tasks = [tasks] if isinstance(tasks, str) else list(OmegaConf.to_container(tasks, resolve=True))
    manager = TaskManager(include_path=cfg.harness.include_path) if cfg.harness.include_path else TaskManager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.harness.batch_size)

    def scores() -> dict[str, float]:
        try:
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=cfg.harness.limit,
                num_fewshot=cfg.harness.num_fewshot,
            )
        except KeyError as e:  # lm-eval's "not a registered task" error
            raise UserError(f"harness.tasks={tasks}: {e.args[0] if e.args else e}") from None
        flat = {}
        for task, metrics in out["results"].items():
            for key, value in metrics.items():
                name = key.split(",")[0]
                skip = name in SKIP_HARNESS_KEYS or name.endswith("_stderr")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not skip:
                    flat[f"harness/{task}/{name}"] = float(value)
        return flat

    return per_adapter(model, runs, cfg.base, scores)


def with_run_data_choice(argv: list[str]) -> list[str]:
    """Select the first run's ``data`` option so that ``data.*`` overrides type-check against it."""
    if any(a.split("=", 1)[0].lstrip("+~") == "data" for a in argv):
        return argv
    if any(a.startswith("data_file=") for a in argv) and (Path(config_dir()) / "data" / "jsonl.yaml").is_file():
        return [*argv, "data=jsonl"]  # a local file, whatever data the run trained on
    raw = next((a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")), None)
    if raw is None:
        return argv
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from lora_exp.inference.session import load_run, run_dirs

        value = OverridesParser.create().parse_overrides([f"run_dir={raw}"])[0].value()
        choice = load_run(run_dirs(value)[0]).group_choice("data")
    except Exception:  # a bad run_dir is reported by evaluate() itself, as one clear line
        return argv
    if choice and (Path(config_dir()) / "data" / f"{choice}.yaml").is_file():
        return [*argv, f"data={choice}"]
    return argv
