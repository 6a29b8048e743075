"""LoRA variants on the tiny Llama: each trains through the real pipeline and shows in the saved adapter.

One table, one short run per row (in-process ``train``: the same code path as the CLI, without
paying the interpreter start for each). Rows are cached, so tests that compare two rows
(LoRA+ against plain LoRA) share the baseline run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from lora_exp import metrics as M
from lora_exp.model import lora
from lora_exp.runs.rundir import INITIAL_ADAPTER_DIR

COMMON = (
    "model=tiny_llama",
    "debug=quick",
    "logger=none",
    "callbacks=none",
    "trainer.max_steps=2",
    "optim.warmup_ratio=0",  # both steps learn at the full rate
    "data.num_val=8",
)

# name -> overrides; the check for each row is the test of the same name below
VARIANTS = {
    "baseline": [],
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true", "lora.r=4", "lora.alpha=8"],
    "gaussian": ["lora.init=gaussian"],
    # fp32 so the reloaded adapter must reproduce the run's own held-out loss to 1e-4
    "pissa": ["lora.init=pissa", "trainer.precision=32-true"],
    "olora": ["lora.init=olora", "trainer.precision=32-true"],
    "loraplus": ["optim=loraplus"],
    "modules_to_save": ["lora.modules_to_save=[embed_tokens,lm_head]"],
    "all_linear": ["lora.target_modules=all_linear"],
    # PEFT's own spellings, passed through as given
    "peft_all_linear": ["lora.target_modules=all-linear"],
    "peft_regex": [r"lora.target_modules='.*\.(q|v)_proj'"],
    "peft_rank_pattern": ["+lora.rank_pattern={q_proj:4}", "+lora.alpha_pattern={q_proj:8}", "+lora.lora_dropout=0.1"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lora_exp.training.run import train

    done: dict[str, tuple[Path, dict, object]] = {}

    def _run(name: str):
        if name not in done:
            run_dir = tmp_path_factory.mktemp(name) / "run"
            cfg = compose(*COMMON, *VARIANTS[name], run_dir=run_dir)
            done[name] = (run_dir, train(cfg), cfg)
        return done[name]

    return _run


def _adapter(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    adapter = run_dir / "adapter"
    return json.loads((adapter / "adapter_config.json").read_text()), load_file(adapter / "adapter_model.safetensors")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_saves_an_adapter(run, name):
    run_dir, record, _ = run(name)
    assert record[M.STATUS] == M.STATUS_COMPLETED
    assert record[M.STEPS] == 2
    assert record[M.VAL_LOSS] < record[M.base(M.VAL_LOSS)], "held-out loss did not go down"
    config, weights = _adapter(run_dir)
    assert config["peft_type"] == "LORA" and weights
    assert not (run_dir / INITIAL_ADAPTER_DIR).exists()


def test_dora_saves_magnitude_vectors(run):
    run_dir, record, _ = run("dora")
    config, weights = _adapter(run_dir)
    assert config["use_dora"] is True
    magnitudes = {k: v for k, v in weights.items() if k.endswith("lora_magnitude_vector")}
    # one per adapted module: 4 attention projections x 2 layers, each of the layer's output width
    assert len(magnitudes) == 8
    assert all(v.ndim == 1 for v in magnitudes.values())


def test_rslora_scales_by_alpha_over_sqrt_r(run):
    run_dir, record, _ = run("rslora")
    config, _ = _adapter(run_dir)
    assert config["use_rslora"] is True
    assert record[M.LORA_SCALING] == pytest.approx(8 / math.sqrt(4))


def test_gaussian_init_is_recorded(run):
    config, _ = _adapter(run("gaussian")[0])
    assert config["init_lora_weights"] == "gaussian"


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_base_mutating_init_saves_a_plain_lora_adapter_of_the_original_base(run, name):
    """PiSSA/OLoRA change the base weights; the saved adapter is converted so plain PEFT on the
    untouched base reproduces what the run measured."""
    from peft import PeftModel

    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.model.load import load_base_model, load_tokenizer, resolve_model_folder
    from lora_exp.training.loss import causal_lm_loss

    run_dir, record, cfg = run(name)
    config, _ = _adapter(run_dir)
    assert config["init_lora_weights"] is True  # an ordinary LoRA adapter now ...
    assert config["r"] == 2 * cfg.lora.r  # ... of rank 2r: trained minus initial update

    folder = resolve_model_folder(cfg.model)
    model = PeftModel.from_pretrained(load_base_model(cfg.model, folder), run_dir / "adapter").eval()
    datamodule = InstructionDataModule(cfg.data, load_tokenizer(folder), cfg.seed)
    datamodule.setup("fit")
    loss_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            out = causal_lm_loss(model, batch)
            loss_sum, n_tokens = loss_sum + out.loss_sum.item(), n_tokens + out.n_tokens.item()
    assert loss_sum / n_tokens == pytest.approx(record[M.VAL_LOSS], abs=1e-4)


def test_loraplus_trains_b_faster_than_plain_lora(run):
    def mean_abs_b(name):
        _, weights = _adapter(run(name)[0])
        return torch.cat([v.abs().flatten() for k, v in weights.items() if "lora_B" in k]).mean().item()

    # B starts at zero in both runs; with the same lr for A, LoRA+ moves B ~16x further
    assert mean_abs_b("loraplus") > 8 * mean_abs_b("baseline")


def test_loraplus_optimizer_groups_follow_the_ratio():
    from lora_exp.model.load import load_base_model, resolve_model_folder
    from lora_exp.training.module import loraplus_optimizer

    cfg = compose("model=tiny_llama", "optim=loraplus", "optim.lr=2e-4")
    model = lora.wrap(load_base_model(cfg.model, resolve_model_folder(cfg.model)), cfg.lora)
    optimizer = loraplus_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {
        "lora_A" if "lora_A" in names[id(p)] else "lora_B": group["lr"]
        for group in optimizer.param_groups
        for p in group["params"]
    }
    assert lrs == {"lora_A": pytest.approx(2e-4), "lora_B": pytest.approx(2e-4 * 16)}
    assert isinstance(optimizer, torch.optim.AdamW)


def test_modules_to_save_trains_and_saves_whole_modules(run):
    from lora_exp.model.load import load_base_model, resolve_model_folder

    run_dir, record, cfg = run("modules_to_save")
    config, weights = _adapter(run_dir)
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    vocab, hidden = cfg.model.config.vocab_size, cfg.model.config.hidden_size
    embed = weights["base_model.model.model.embed_tokens.weight"]
    head = weights["base_model.model.lm_head.weight"]
    assert embed.shape == head.shape == (vocab, hidden)
    base = load_base_model(cfg.model, resolve_model_folder(cfg.model))
    assert not torch.equal(embed, base.get_input_embeddings().weight.detach()), "embed_tokens did not train"
    # each listed module trains as a whole copy of its own (tied embeddings become untied)
    baseline = run("baseline")[1]
    assert record[M.TRAINABLE_PARAMS] == baseline[M.TRAINABLE_PARAMS] + 2 * vocab * hidden


def test_all_linear_adapts_every_projection(run):
    from lora_exp.model.load import load_base_model, resolve_model_folder

    run_dir, record, cfg = run("all_linear")
    config, _ = _adapter(run_dir)
    assert sorted(config["target_modules"]) == sorted(lora.TARGET_PRESETS["all_linear"])
    base = load_base_model(cfg.model, resolve_model_folder(cfg.model))
    expected = sum(
        cfg.lora.r * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.TARGET_PRESETS["all_linear"]
    )
    assert record[M.TRAINABLE_PARAMS] == expected


def _grads(*overrides):
    """LoRA gradients of one batch through the project's loss."""
    import lightning as L

    from lora_exp.model.load import load_base_model, resolve_model_folder
    from lora_exp.training.loss import causal_lm_loss

    cfg = compose("model=tiny_llama", "lora.dropout=0", *overrides)
    base = load_base_model(cfg.model, resolve_model_folder(cfg.model))
    L.seed_everything(0, verbose=False)
    model = lora.wrap(base, cfg.lora)
    model.train()
    ids = torch.randint(3, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :16] = -100
    out = causal_lm_loss(model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    (out.loss_sum / out.n_tokens).backward()
    return model, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def test_gradient_checkpointing_switch_gives_the_same_gradients():
    plain_model, plain = _grads()
    model, checkpointed = _grads("model.gradient_checkpointing=true")
    assert _checkpointing(model) and not _checkpointing(plain_model)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_switch_compiles_each_decoder_layer_and_keeps_parameter_names():
    """Wiring only: compiling happens at the first forward (minutes on a loaded CPU; real runs do it)."""
    from lora_exp.model.load import compile_layers, decoder_layers, load_base_model, resolve_model_folder

    cfg = compose("model=tiny_llama", "model.compile=true")
    model = lora.wrap(load_base_model(cfg.model, resolve_model_folder(cfg.model)), cfg.lora)
    names = list(model.state_dict())
    assert compile_layers(model) == cfg.model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert list(model.state_dict()) == names


def _plain_peft(cfg, run_dir: Path):
    """The saved adapter loaded by plain PEFT (``PeftModel.from_pretrained``) on a fresh base."""
    from peft import PeftModel

    from lora_exp.model.load import load_base_model, resolve_model_folder

    base = load_base_model(cfg.model, resolve_model_folder(cfg.model))
    return PeftModel.from_pretrained(base, str(run_dir / "adapter"))


def _loads_exactly(cfg, run_dir: Path) -> dict[str, torch.Tensor]:
    """Load with plain PEFT; every saved tensor is in the loaded model, equal; return its LoRA weights."""
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(_plain_peft(cfg, run_dir))
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    return saved


@pytest.mark.parametrize(
    ("name", "asked", "adapted"),
    [
        ("peft_all_linear", "all-linear", lora.TARGET_PRESETS["all_linear"]),
        ("peft_regex", r".*\.(q|v)_proj", ["q_proj", "v_proj"]),
    ],
)
def test_peft_target_spellings_reach_the_adapter_config_as_given(run, name, asked, adapted):
    run_dir, record, cfg = run(name)
    config, _ = _adapter(run_dir)
    assert config["target_modules"] == asked
    weights = _loads_exactly(cfg, run_dir)
    leaves = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights}
    assert leaves == set(adapted)  # PEFT re-expands the saved spelling to the same modules
    assert record[M.TRAINABLE_PARAMS] == sum(v.numel() for v in weights.values())


def test_peft_fields_reach_peft(run):
    run_dir, record, cfg = run("peft_rank_pattern")
    config, weights = _adapter(run_dir)
    assert config["rank_pattern"] == {"q_proj": 4} and config["alpha_pattern"] == {"q_proj": 8}
    assert config["lora_dropout"] == 0.1 and config["r"] == cfg.lora.r
    ranks = {k: v.shape[0] for k, v in weights.items() if "lora_A" in k}
    assert {r for k, r in ranks.items() if "q_proj" in k} == {4}
    assert {r for k, r in ranks.items() if "q_proj" not in k} == {cfg.lora.r}
    model = _plain_peft(cfg, run_dir)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.r["default"] == 4 and q.scaling["default"] == pytest.approx(8 / 4)
    _loads_exactly(cfg, run_dir)
