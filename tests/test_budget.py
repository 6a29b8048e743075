"""Parameter budgets (``lora.budget``): per-module ranks whose PEFT count is the budget.

Llama-3.1-8B is built on the meta device from the architecture shipped in conf/model (as
``plan`` does, no weights, offline); the count checked is PEFT's own ``get_nb_trainable_parameters``.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, run_cli
from lora_exp import metrics as M
from lora_exp.errors import ConfigError
from lora_exp.model import budget, lora
from lora_exp.planning.planner import build_meta_model

LLAMA_8B = ("model=llama3_1_8b", "model.dtype=bfloat16")
BUDGET = 13_631_488  # LoRA r=16 on q,k,v,o of Llama-3.1-8B


@pytest.mark.parametrize("targets", ["qv", "qkvo", "all_linear"])
@pytest.mark.parametrize("n", [BUDGET, 5_000_000])
def test_llama_8b_count_is_within_one_percent_of_the_budget(targets, n):
    peft_model, _ = build_meta_model(compose(*LLAMA_8B, f"lora.budget={n}", f"lora.target_modules={targets}"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert abs(trainable - n) <= 0.01 * n
    ranks = budget.module_ranks(peft_model)
    assert min(ranks.values()) >= 1 and max(ranks.values()) - min(ranks.values()) <= 1
    assert len(ranks) == 32 * len(lora.TARGET_PRESETS[targets])


def test_llama_8b_ranks_follow_the_architecture():
    """At one budget, more (and wider) targets get lower ranks; GQA's narrow k/v are counted as such."""
    base = {}
    for targets in ("qv", "qkvo", "all_linear"):
        peft_model, _ = build_meta_model(compose(*LLAMA_8B, f"lora.budget={BUDGET}", f"lora.target_modules={targets}"))
        base[targets] = peft_model.peft_config["default"].r
    # per layer: q 4096+4096, k and v 4096+1024 (8 KV heads), o 4096+4096, MLP 3 x (4096+14336)
    assert base == {"qv": BUDGET // (32 * 13312), "qkvo": BUDGET // (32 * 26624), "all_linear": BUDGET // (32 * 81920)}
    assert base == {"qv": 32, "qkvo": 16, "all_linear": 5}


def _tiny_base():
    from lora_exp.model.load import load_base_model, resolve_model_folder

    cfg = compose("model=tiny_llama")
    return load_base_model(cfg.model, resolve_model_folder(cfg.model))


@pytest.mark.parametrize(
    ("n", "extra"),
    [(20000, []), (20000, ["lora.use_dora=true"]), (3_200_000, ["lora.modules_to_save=[lm_head]"])],
)
def test_the_rule_predicts_peft_count_and_keeps_the_scaling(n, extra):
    from omegaconf import OmegaConf

    cfg = compose("model=tiny_llama", f"lora.budget={n}", "lora.target_modules=qv", "lora.alpha=32", *extra)
    base = _tiny_base()
    plain = OmegaConf.to_container(cfg.lora)
    plain["budget"] = None
    solution = budget.solve(base, lora.peft_config(OmegaConf.create(plain)), n)
    model = lora.wrap(base, cfg.lora)
    # DoRA magnitudes and the lm_head copy are counted as fixed parameters
    assert model.get_nb_trainable_parameters()[0] == solution.predicted
    assert abs(solution.predicted - n) <= 0.01 * n
    assert budget.module_ranks(model) == solution.ranks
    # every module keeps the configured scaling alpha/r = 32/16 = 2, whatever rank it got
    scalings = [m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A")]
    assert len(set(solution.ranks.values())) == 2 and scalings == pytest.approx([2.0] * 4)


def test_rslora_keeps_alpha_over_sqrt_r():
    cfg = compose("model=tiny_llama", "lora.budget=20000", "lora.target_modules=qv", "lora.use_rslora=true")
    model = lora.wrap(_tiny_base(), cfg.lora)
    assert len(set(budget.module_ranks(model).values())) == 2
    scalings = [m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A")]
    assert scalings == pytest.approx([16 / math.sqrt(16)] * 4)


def test_too_small_a_budget_is_refused_naming_the_minimum():
    cfg = compose("model=tiny_llama", "lora.budget=100", "lora.target_modules=qv")
    # rank 1 everywhere: 2 layers x (q 64+64, v 64+32)
    with pytest.raises(ConfigError, match=re.escape("the minimum is 448")):
        lora.wrap(_tiny_base(), cfg.lora)


def test_budget_with_rank_pattern_is_refused():
    from lora_exp.config.validate import validate

    with pytest.raises(ConfigError, match=r"lora\.rank_pattern: lora\.budget sets"):
        validate(compose("model=tiny_llama", "lora.budget=20000", "+lora.rank_pattern={q_proj:4}"))


def test_tiny_run_saves_an_adapter_of_the_budget(tmp_path):
    """Through the real training path: the saved adapter carries the solved ranks and its count."""
    from peft import PeftModel, get_peft_model_state_dict

    from lora_exp.training.run import train

    run_dir = tmp_path / "run"
    cfg = compose(
        "model=tiny_llama",
        "debug=quick",
        "logger=none",
        "callbacks=none",
        "trainer.max_steps=1",
        "lora.budget=30000",
        "lora.target_modules=all_linear",
        run_dir=run_dir,
    )
    record = train(cfg)
    assert record[M.STATUS] == M.STATUS_COMPLETED
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    saved = sum(t.numel() for t in weights.values())
    assert saved == record[M.TRAINABLE_PARAMS]
    assert abs(saved - 30000) <= 300
    assert config["rank_pattern"] and config["r"] == 30000 // (2 * (128 + 96 + 96 + 128 + 3 * 192))
    reloaded = PeftModel.from_pretrained(_tiny_base(), str(run_dir / "adapter"))
    assert reloaded.get_nb_trainable_parameters()[0] == 0  # inference mode: frozen ...
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" in n) == saved  # ... same shapes
    loaded = get_peft_model_state_dict(reloaded)  # plain PEFT rebuilt every solved rank
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_plan_sweeps_target_sets_under_one_budget(tmp_path):
    proc = run_cli(
        "lora_exp.plan",
        "-m",
        "model=tiny_llama",
        "lora.budget=200000",
        "lora.target_modules=qv,qkvo,all_linear",
        cwd=tmp_path,
    )
    counts = [int(m.replace(",", "")) for m in re.findall(r"PEFT counts ([\d,]+) trainable", proc.stdout)]
    assert len(counts) == 3 and all(abs(c - 200000) <= 2000 for c in counts)
    assert proc.stdout.count("lora.budget=200,000: ranks q_proj") == 3
