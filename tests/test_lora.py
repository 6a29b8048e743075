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


def test_target_modules_accept_lists_presets_and_peft_strings():
    assert lora.resolve_target_modules("qv") == ["q_proj", "v_proj"]
    assert lora.resolve_target_modules(["q_proj", "down_proj"]) == ["q_proj", "down_proj"]
    assert lora.resolve_target_modules("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert lora.resolve_target_modules("self_attn.q_proj") == ["self_attn.q_proj"]
    # PEFT's spellings stay strings: all-linear, and a regex PEFT full-matches against module names
    assert lora.resolve_target_modules("all-linear") == "all-linear"
    assert lora.resolve_target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
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


def _problems(*overrides) -> list[str]:
    from lora_exp.config.validate import validate

    try:
        validate(compose("model=tiny_llama", *overrides))
    except ConfigError as e:
        return e.problems
    return []


def test_unknown_lora_key_names_the_closest_loraconfig_field():
    assert _problems("+lora.rnk=4") == ["lora.rnk: no such LoRA setting; did you mean r?"]
    assert _problems("+lora.rank_patern={q_proj:4}") == [
        "lora.rank_patern: no such LoRA setting; did you mean rank_pattern?"
    ]
    assert _problems("+lora.task_type=SEQ_CLS") == ["lora.task_type: set by lora-exp itself; remove it"]


def test_peft_values_are_checked_with_peft_own_rules():
    assert _problems("lora.target_modules=all-linear", r"lora.target_modules='.*\.(q|v)_proj'") == []
    assert "nor a valid regular expression" in " ".join(_problems("lora.target_modules='.*(q|v_proj'"))
    assert _problems("lora.bias=some") == ["lora.bias='some': expected one of ['none', 'all', 'lora_only']"]
    # PEFT's own refusal, in its words, before any weight is loaded
    (problem,) = _problems("lora.target_modules=all-linear", "+lora.layers_to_transform=[0]")
    assert problem.startswith("lora: PEFT refuses these settings:") and "layers_to_transform" in problem


def test_peft_names_are_aliases_and_giving_both_is_refused():
    cfg = compose("+lora.lora_alpha=32", "+lora.lora_dropout=0.2", "+lora.init_lora_weights=gaussian")
    assert _problems("+lora.lora_alpha=32", "+lora.lora_dropout=0.2", "+lora.init_lora_weights=gaussian") == []
    config = lora.peft_config(cfg.lora)
    assert (config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (32, 0.2, "gaussian")
    assert lora.lora_scaling(cfg.lora) == 32 / 16
    problems = _problems("lora.alpha=8", "+lora.lora_alpha=32")
    assert problems == ["lora.lora_alpha and lora.alpha are the same setting (PEFT's name and ours); give one"]


def test_every_loraconfig_field_is_a_lora_key_and_reaches_peft():
    for name in set(lora.peft_fields()) - lora.MANAGED:
        assert lora.unknown_key_problem(name) is None, name
    cfg, base = _tiny("+lora.exclude_modules=[model.layers.1.self_attn.q_proj]", "+lora.layers_to_transform=[1]")
    assert _problems("+lora.exclude_modules=[model.layers.1.self_attn.q_proj]", "+lora.layers_to_transform=[1]") == []
    model = lora.wrap(base, cfg.lora)
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {f"model.layers.1.self_attn.{p}" for p in ("k_proj", "v_proj", "o_proj")}


def test_command_line_checks_accept_peft_spellings_and_name_the_closest_key(tmp_path):
    from conftest import train_cli
    from lora_exp.config.validate import override_problems

    assert override_problems(["lora.target_modules=all-linear", r"lora.target_modules='.*\.(q|v)_proj'"]) == []
    (problem,) = override_problems(["lora.rnk=4"])
    assert problem.startswith("lora.rnk: no such config key") and problem.endswith("did you mean r?")
    proc = train_cli(tmp_path / "run", "model=tiny_llama", "+lora.rnk=4", check=False)
    assert proc.returncode == 2
    # the project's one error: the command, then each problem (here one)
    assert proc.stderr.strip().splitlines()[-2:] == [
        "lora_exp.train: error: invalid config:",
        "  - lora.rnk: no such LoRA setting; did you mean r?",
    ]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "adapter").exists()
