"""Every config file under conf/ composes and resolves, so no option rots."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import CONF, compose

GROUP_OPTIONS = sorted(
    (group.name, path.stem)
    for group in CONF.iterdir()
    if group.is_dir() and group.name != "hydra"
    for path in group.glob("*.yaml")
)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose(f"{group}={option}", run_dir=tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["model"]["name"] and plain["lora"]["r"] >= 1


PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))  # train, evaluate, generate, export
HYDRA_OPTIONS = sorted(
    (f"hydra/{group.name}", path.stem)
    for group in (CONF / "hydra").iterdir()
    if group.is_dir()
    for path in group.glob("*.yaml")
)


def _hydra_compose(config_name: str, *overrides: str):
    """Compose with Hydra's own node (``hydra.*``), resolvers registered, as the commands do."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_exp.config.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)


def test_every_file_under_conf_is_composed_by_a_test():
    covered = {CONF / f"{name}.yaml" for name in PRIMARY}
    covered |= {CONF / group / f"{option}.yaml" for group, option in GROUP_OPTIONS + HYDRA_OPTIONS}
    covered.add(CONF / "hydra" / "default.yaml")  # the hydra group of every primary config
    assert set(CONF.rglob("*.yaml")) == covered


@pytest.mark.parametrize("name", PRIMARY)
def test_every_primary_config_composes(name, tmp_path):
    overrides = [] if name == "train" else [f"run_dir={tmp_path}"]
    cfg = _hydra_compose(name, *overrides)
    assert cfg.hydra.help.app_name and cfg.hydra.run.dir
    if name != "train":  # the inference commands read a finished run
        assert cfg.run_dir == str(tmp_path)


@pytest.mark.parametrize(("group", "option"), HYDRA_OPTIONS, ids=[f"{g}={o}" for g, o in HYDRA_OPTIONS])
def test_every_hydra_option_composes(group, option):
    cfg = _hydra_compose("train", f"{group}={option}")
    assert OmegaConf.select(cfg, group.replace("/", "."))._target_


@pytest.mark.parametrize("option", sorted(o for g, o in GROUP_OPTIONS if g == "hparams_search"))
def test_every_named_sweep_resolves_its_hydra_node(option, tmp_path):
    cfg = _hydra_compose("train", f"hparams_search={option}", f"paths.output_dir={tmp_path}")
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    assert str(cfg.hydra.sweep.dir).startswith(f"{tmp_path}/sweeps/{option}/")


def test_default_is_the_embedded_model_with_usual_lora_defaults(tmp_path):
    cfg = compose(run_dir=tmp_path)
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "embedded"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (16, 16, 0.05, "qkvo")


def test_llama_configs_carry_real_hub_ids(tmp_path):
    ids = {
        name: compose(f"model={name}", run_dir=tmp_path).model.hub_id
        for name in ("llama3_1_8b", "llama3_1_8b_instruct", "llama3_1_70b")
    }
    assert ids == {
        "llama3_1_8b": "meta-llama/Llama-3.1-8B",
        "llama3_1_8b_instruct": "meta-llama/Llama-3.1-8B-Instruct",
        "llama3_1_70b": "meta-llama/Llama-3.1-70B",
    }
