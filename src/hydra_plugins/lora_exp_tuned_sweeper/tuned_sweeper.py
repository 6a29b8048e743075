"""Per-configuration learning-rate tuning as a Hydra sweeper: ``hydra/sweeper=tuned``.

A grid at one fixed learning rate mostly measures which configuration that rate suits (the optimal
LoRA rate moves with rank and scaling), so this sweeper runs, for every configuration of the grid:

1. a learning-rate search on the validation split: every rate of ``lrs`` at seed ``tune_seed``
   (or, with ``halving.rungs=[S1, S2, ...]``, successive halving: all rates for S1 steps, the best
   ``1/halving.eta`` of them for S2 steps, ...), scored by ``optimized_metric`` in its direction
   (``lora_exp.metrics``);
2. the seed replicates (``seeds``) at the chosen rate, with the command's own step budget.

Jobs go through the configured launcher (basic, joblib, submitit/SLURM), one run directory each:
``<sweep dir>/<configuration>/lr=<rate>/seed=<seed>`` (halving rungs under ``tune/steps=<S>/``).
Every job runs with ``resume=true``, so re-running the same command with the same
``hydra.sweep.dir`` skips finished jobs, and a replicate at ``tune_seed`` that the search already
trained (no halving) is the search's own run, not a second one. ``tuning.json`` in the sweep
directory records, per configuration, the candidates, their scores, the chosen rate and the run
directories of the replicates; ``python -m lora_exp.report`` reads it and shows the chosen rate.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

TUNING_FILE = "tuning.json"
_OWNED = ("optim.lr", "seed")  # keys this sweeper sets per job (and trainer.max_steps when halving)


class TunedSweeper(Sweeper):
    """Learning rate tuned per configuration, then seed replicates at the chosen rate."""

    def __init__(
        self,
        lrs: list[float],
        seeds: list[int],
        tune_seed: int = 0,
        halving: dict | None = None,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
    ):
        self.lrs = [float(x) for x in lrs]
        self.seeds = [int(s) for s in seeds]
        self.tune_seed = int(tune_seed)
        halving = dict(halving or {})
        self.rungs = [int(s) for s in halving.get("rungs") or []]
        self.eta = int(halving.get("eta", 2))
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        if not self.lrs or not self.seeds:
            raise HydraException("hydra.sweeper.lrs and hydra.sweeper.seeds must each name at least one value")
        if self.eta < 2 or any(s <= 0 for s in self.rungs):
            raise HydraException("hydra.sweeper.halving: eta must be >= 2 and every rung a positive step count")

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.job_idx = 0

    # ---- the protocol ---------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        from lora_exp import metrics as M

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        keys = _OWNED + (("trainer.max_steps",) if self.rungs else ())
        owned = [o.get_key_element() for o in overrides if o.get_key_element().lstrip("+~") in keys]
        if owned:
            raise HydraException(
                f"{', '.join(owned)}: set by hydra/sweeper=tuned per job; use hydra.sweeper.lrs, "
                f"hydra.sweeper.seeds and hydra.sweeper.halving.rungs instead"
            )
        # every job runs with resume=true (finished jobs are skipped), so the command's own is not repeated
        overrides = [o for o in overrides if o.get_key_element().lstrip("+~") != "resume"]
        grid = BasicSweeper.split_arguments(overrides, None)[0]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        metric = str(self.config.get("optimized_metric") or M.VAL_LOSS)
        if M.goal(metric) is None:
            raise HydraException(f"optimized_metric={metric}: no direction in lora_exp.metrics to pick a rate by")
        configs = [{"name": name, "overrides": list(c)} for name, c in zip(config_names(grid), grid)]
        for c in configs:
            c["candidates"] = self._search(c, metric)
            c["chosen_lr"] = best_lr(c["candidates"], metric)
        self._write(sweep_dir, configs, metric)
        returns = self._launch([job for c in configs if c["chosen_lr"] is not None for job in self._replicates(c)])
        for c in configs:  # the replicates' run directories, for the report
            c["runs"] = [str(sweep_dir / self._subdir(c, c["chosen_lr"], s, None)) for s in self.seeds]
        self._write(sweep_dir, configs, metric)
        return [returns]

    def _search(self, c: dict, metric: str) -> dict[str, float | None]:
        """Scores of every candidate rate for one configuration (the last rung's, with halving)."""
        alive = list(self.lrs)
        scores: dict[str, float | None] = {}
        for steps in self.rungs or [None]:
            jobs = [self._job(c, lr, self.tune_seed, steps) for lr in alive]
            results = self._launch(jobs)
            rung = {_key(lr): _score(r) for lr, r in zip(alive, results)}
            scores.update(rung)
            ranked = sorted(
                (lr for lr in alive if rung[_key(lr)] is not None), key=lambda lr: _rank(rung[_key(lr)], metric)
            )
            alive = ranked[: max(1, math.ceil(len(ranked) / self.eta))]
            for lr in self.lrs:  # rates dropped at an earlier rung keep their last score
                scores.setdefault(_key(lr), None)
        return {k: scores[k] for k in sorted(scores, key=float)}

    def _replicates(self, c: dict) -> list[list[str]]:
        return [self._job(c, c["chosen_lr"], s, None) for s in self.seeds]

    def _job(self, c: dict, lr: float, seed: int, steps: int | None) -> list[str]:
        job = [*c["overrides"], f"optim.lr={lr}", f"seed={seed}", "resume=true"]
        if steps is not None:
            job.append(f"trainer.max_steps={steps}")
        return [*job, f"hydra.sweep.subdir='{self._subdir(c, lr, seed, steps)}'"]

    @staticmethod
    def _subdir(c: dict, lr: float, seed: int, steps: int | None) -> str:
        rung = f"tune/steps={steps}/" if steps is not None else ""
        return f"{c['name']}/{rung}lr={lr:g}/seed={seed}"

    def _launch(self, jobs: list[list[str]]) -> list:
        results = []
        for i in range(0, len(jobs), self.max_batch_size or max(len(jobs), 1)):
            batch = jobs[i : i + (self.max_batch_size or len(jobs))]
            results += list(self.launcher.launch(batch, initial_job_idx=self.job_idx))
            self.job_idx += len(batch)
        return results

    def _write(self, sweep_dir: Path, configs: list[dict], metric: str) -> None:
        protocol = (
            f"learning rate tuned per configuration on {metric} "
            f"({'min' if _minimize(metric) else 'max'}imised) over {', '.join(f'{x:g}' for x in self.lrs)} at seed "
            f"{self.tune_seed}"
            + (f", successive halving over {self.rungs} steps (eta {self.eta})" if self.rungs else "")
            + f"; {len(self.seeds)} seed(s) at the chosen rate"
        )
        doc = {"protocol": protocol, "metric": metric, "lrs": self.lrs, "seeds": self.seeds, "configs": configs}
        tmp = sweep_dir / f".{TUNING_FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(sweep_dir / TUNING_FILE)
        log.info("%s -> %s", protocol, sweep_dir / TUNING_FILE)


def config_names(grid: list[list[str]]) -> list[str]:
    """A directory name per grid configuration: its swept overrides (the keys whose value varies), filesystem-safe."""
    varying = {o.split("=", 1)[0] for c in grid for o in c if any(o not in other for other in grid)}
    names = []
    for c in grid:
        name = ",".join(o.lstrip("+~") for o in c if o.split("=", 1)[0] in varying and not o.startswith("hydra."))
        names.append(re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)[:200] or "default")
    return names


def best_lr(scores: dict[str, float | None], metric: str) -> float | None:
    """The rate with the best score in ``metric``'s direction; None when every candidate failed."""
    done = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
    if not done:
        return None
    return float(min(done, key=lambda k: _rank(done[k], metric)))


def _minimize(metric: str) -> bool:
    from lora_exp import metrics as M

    return M.goal(metric) == "min"


def _rank(value: float, metric: str) -> float:
    return value if _minimize(metric) else -value


def _key(lr: float) -> str:
    return f"{lr:g}"


def _score(result) -> float | None:
    """The job's optimized metric, or None for a failed job (a failed rate never wins)."""
    if result.status != JobStatus.COMPLETED:
        return None
    value = result.return_value
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
