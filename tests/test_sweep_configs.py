"""Every named sweep (the ``hparams_search`` group) composes, sweeps real keys and optimises a real metric.

No training here; ``test_named_sweep_runs_from_any_directory`` in test_sweep.py runs one.
"""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose
from lora_exp import metrics as M
from lora_exp.config.resolvers import register_resolvers
from lora_exp.config.validate import validate

SWEEPS = ROOT / "sweeps"
NAMED = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
WANDB_SWEEPS = sorted(p for p in SWEEPS.glob("*.yaml") if "command" in yaml.safe_load(p.read_text()))


def compose_sweep(name: str, *overrides: str, hydra_node: bool = True, old_spelling: bool = False):
    """Compose ``hparams_search=<name>`` as ``python -m lora_exp.train hparams_search=<name>`` would.

    With ``old_spelling``, ``sweeps/<name>.yaml`` as ``-cd sweeps -cn <name>`` would. With
    ``hydra_node=False`` the result is what a job receives (no ``hydra`` key).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    if old_spelling:
        with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
            return hydra_compose(
                name, overrides=[f"hydra.searchpath=[file://{CONF}]", *overrides], return_hydra_config=hydra_node
            )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=[f"hparams_search={name}", *overrides], return_hydra_config=hydra_node)


def _first_value(spec: str) -> str:
    """A concrete value from a basic-sweeper (``4,8``) or Optuna (``choice(4, 8)``) parameter."""
    spec = str(spec)
    if spec.startswith(("choice(", "range(")):
        return spec[spec.index("(") + 1 :].split(",")[0].strip(" )")
    if spec.startswith(("interval(", "tag(")):
        return spec.split("interval(")[1].split(",")[0].strip()
    return spec.split(",")[0].strip()


def test_every_named_sweep_is_known_and_the_old_spelling_still_works():
    assert set(NAMED) >= {"full_grid", "optuna", "rank_alpha", "seeds", "target_modules"}
    for path in (CONF / "hparams_search").glob("*.yaml"):  # a group of global deltas, as experiment/ is
        assert path.read_text().startswith("# @package _global_"), path
    # sweeps/: the W&B spec, and for the sweeps that lived there, a file keeping `-cd sweeps -cn NAME`
    assert [p.name for p in WANDB_SWEEPS] == ["wandb_sweep.yaml"]
    old_names = sorted(p.stem for p in SWEEPS.glob("*.yaml") if p.stem != "wandb_sweep")
    assert old_names == ["full_grid", "optuna", "rank_alpha", "seeds", "target_modules"]
    for name in old_names:
        new = OmegaConf.to_container(compose_sweep(name, hydra_node=False), resolve=False)
        old = OmegaConf.to_container(compose_sweep(name, hydra_node=False, old_spelling=True), resolve=False)
        assert new == old, name
        assert compose_sweep(name, old_spelling=True).hydra.sweeper.params == compose_sweep(name).hydra.sweeper.params


@pytest.mark.parametrize("name", NAMED)
def test_hydra_sweep_composes_and_sweeps_real_keys(name: str):
    cfg = compose_sweep(name)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert name in cfg.hydra.sweep.dir  # each named sweep writes its own sweep directory
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params
    for key in params:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        assert node is not None and leaf in node, f"{name}: sweeps {key}, which is not a config key"
    # the objective is a real metric with a known direction
    assert cfg.optimized_metric in M.GOALS, cfg.optimized_metric
    # one concrete point of the sweep is a valid config
    point = compose_sweep(name, *(f"{k}={_first_value(v)}" for k, v in params.items()), hydra_node=False)
    validate(point)


def test_an_experiment_holds_under_a_named_sweep():
    cfg = compose_sweep("rank_alpha", "experiment=json_extract_r32", hydra_node=False)
    assert cfg.lora.target_modules == "all_linear" and cfg.optim.lr == 5.0e-4


def test_optuna_sweep_is_resumable_and_minimises_the_objective(tmp_path):
    cfg = compose_sweep("optuna", f"paths.output_dir={tmp_path}")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == {"min": "minimize", "max": "maximize"}[M.GOALS[cfg.optimized_metric]]
    # persistent storage at a fixed path (not inside the timestamped sweep dir): a rerun resumes
    assert sweeper.study_name
    assert sweeper.storage == f"sqlite:///{tmp_path}/sweeps/optuna/study.db"
    assert (tmp_path / "sweeps" / "optuna").is_dir()
    assert sweeper.max_failure_rate == 1.0  # a failed trial does not end the search


def test_wandb_sweep_spec_runs_our_cli_with_real_keys():
    spec = yaml.safe_load((SWEEPS / "wandb_sweep.yaml").read_text())
    assert spec["metric"]["name"] in M.GOALS
    assert spec["metric"]["goal"] == {"min": "minimize", "max": "maximize"}[M.GOALS[spec["metric"]["name"]]]
    command = spec["command"]
    assert "${args_no_hyphens}" in command and "lora_exp.train" in command
    cfg = compose()
    for key, values in spec["parameters"].items():
        assert OmegaConf.select(cfg, key) is not None, f"wandb_sweep.yaml sweeps {key}, not a config key"
        first = values["values"][0] if "values" in values else values["min"]
        validate(compose(f"{key}={first}"))


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_submitit_launcher_configs_compose(launcher, target):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    # submitit's logs and pickled jobs stay inside the sweep directory
    assert cfg.hydra.launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
