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
