"""PEFT wrapping on the tiny random Llama: what trains, how much, and target-module presets."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from lora_exp.errors import ConfigError
from lora_exp.model import lora
from lora_exp.model.load import load_base_model, resolve_model_folder


def _tiny(*overrides):
    cfg = compose("model=tiny_llama", *overrides)
    return cfg, load_base_model(cfg.model, resolve_model_folder(cfg.model))


@pytest.mark.parametrize("preset", ["qv", "qkvo", "mlp", "all_linear"])
@pytest.mark.parametrize("r", [1, 8])
def test_trainable_count_is_r_times_in_plus_out(preset, r):
    cfg, base = _tiny(f"lora.r={r}", f"lora.target_modules={preset}")
    targets = set(lora.TARGET_PRESETS[preset])
    expected = sum(
        r * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    model = lora.wrap(base, cfg.lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert lora.param_counts(model)[0] == expected
    assert lora.trainable_params_line(model).startswith(f"trainable params: {expected:,d} || all params: ")


def test_target_modules_accept_lists_and_presets():
    assert lora.resolve_target_modules("qv") == ["q_proj", "v_proj"]
    assert lora.resolve_target_modules(["q_proj", "down_proj"]) == ["q_proj", "down_proj"]
    assert lora.resolve_target_modules("q_proj,v_proj") == ["q_proj", "v_proj"]
    cfg = compose("lora.target_modules=[q_proj,up_proj]")
    assert lora.peft_config(cfg.lora).target_modules == {"q_proj", "up_proj"}


def test_unknown_target_module_names_the_modules_that_exist():
    cfg, base = _tiny("lora.target_modules=[query]")
    with pytest.raises(ConfigError, match=r"\['query'\] not found.*q_proj"):
        lora.wrap(base, cfg.lora)


def test_seeded_wrap_gives_identical_lora_init():
    import lightning as L

    weights = []
    for _ in range(2):
        cfg, base = _tiny()
        L.seed_everything(3, verbose=False)
        model = lora.wrap(base, cfg.lora)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
