"""Analytic training FLOPs (lora_exp.planning.flops) against torch's FlopCounterMode, and per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import compose, train_cli
from lora_exp import metrics as M
from lora_exp.planning import flops

# A 256-token vocabulary keeps the LM head from dwarfing the decoder, so a 2% check sees the
# frozen layers, the adapter and attention each (the test asserts each part is a real share).
SMALL_VOCAB = ("model=tiny_llama", "model.config.vocab_size=256")
CASES = {
    "qv": ("lora.target_modules=qv",),
    "all_linear": ("lora.target_modules=all_linear", "lora.r=8"),
    "qv_checkpointing": ("lora.target_modules=qv", "model.gradient_checkpointing=true"),
    "mlp_full_loss_checkpointing": ("lora.target_modules=mlp", "loss.impl=full", "model.gradient_checkpointing=true"),
    "all_linear_recomputed_chunks": ("lora.target_modules=all_linear", "loss.chunk_size=16"),
    "qv_no_fastpath": ("lora.target_modules=qv", "speed.packed_attention=false"),
}


def _compose(*overrides: str):
    cfg = compose(*overrides)
    if cfg.loss.impl == "auto":  # what lora_exp.train picks on a CPU
        cfg.loss.impl = "chunked"
    return cfg


def _model(*overrides: str):
    from lora_exp.model import lora
    from lora_exp.model.load import load_base_model, resolve_model_folder
    from lora_exp.training import fastpath

    cfg = _compose(*overrides)
    torch.manual_seed(0)
    model = lora.wrap(load_base_model(cfg.model, resolve_model_folder(cfg.model)), cfg.lora)
    fastpath.install(model, cfg.get("speed"))  # as training does: packed rows split per example on CPU
    return model.train(), cfg


def _padded(vocab: int) -> dict:
    ids = torch.randint(3, vocab, (3, 48))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 11:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :7] = -100  # the prompt
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _packed(vocab: int) -> dict:
    lengths = [30, 11, 48, 7]
    ids = torch.randint(3, vocab, (1, sum(lengths)))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[0, 30:34] = -100
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def _counted(model, cfg, batch: dict) -> int:
    """Matmul FLOPs of a real forward + backward through the project's training loss.

    The math SDPA kernel decomposes attention into matmuls FlopCounterMode sees (it has no formula
    for torch's CPU flash kernel).
    """
    from lora_exp.training.loss import LOSSES

    loss = LOSSES[cfg.loss.impl]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss(model, batch, int(cfg.loss.chunk_size)).loss_sum.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_analytic_flops_match_flop_counter(case: str, batching: str):
    model, cfg = _model(*SMALL_VOCAB, *CASES[case])
    batch = (_padded if batching == "padded" else _packed)(256)
    analytic = flops.from_peft_model(model, cfg.loss.impl, int(cfg.loss.chunk_size))
    parts = analytic.step(flops.batch_shape(batch, analytic.attn_implementation))
    assert parts["total"] == pytest.approx(_counted(model, cfg, batch), rel=0.02)
    for part in ("base", "lora", "attention", "head"):  # leaving any one out would miss by more than 2%
        assert parts[part] > 0.04 * parts["total"], (part, parts)
    if "checkpointing" in case or "chunks" in case:
        assert parts["recompute"] > 0.02 * parts["total"]
    else:
        assert parts["recompute"] == 0


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_full_fine_tuning_flops_match_flop_counter(batching: str):
    """method=full: every projection's weight gradient too (about 3x the forward), on a plain causal LM."""
    from lora_exp.model.load import load_base_model, resolve_model_folder
    from lora_exp.training import fastpath, full

    cfg = _compose(*SMALL_VOCAB, "method=full")
    torch.manual_seed(0)
    model = load_base_model(cfg.model, resolve_model_folder(cfg.model))
    full.train_every_weight(model)
    fastpath.install(model, cfg.get("speed"))
    model.train()
    batch = (_padded if batching == "padded" else _packed)(256)
    analytic = flops.from_peft_model(model, cfg.loss.impl, int(cfg.loss.chunk_size))
    parts = analytic.step(flops.batch_shape(batch, analytic.attn_implementation))
    assert analytic.full and parts["lora"] == 0
    assert parts["total"] == pytest.approx(_counted(model, cfg, batch), rel=0.02)


def test_default_vocabulary_and_packed_attention_cost_less_than_padded_rows():
    """The shipped tiny model (49k vocabulary: the head dominates) and per-example attention."""
    model, cfg = _model("model=tiny_llama", "lora.target_modules=all_linear")
    batch = _packed(1000)
    analytic = flops.from_peft_model(model, cfg.loss.impl, int(cfg.loss.chunk_size))
    assert analytic.batch_flops(batch) == pytest.approx(_counted(model, cfg, batch), rel=0.02)
    per_example = flops.batch_shape(batch, analytic.attn_implementation)
    assert per_example.blocks == (30, 11, 48, 7) and per_example.supervised == 87
    whole_row = flops.batch_shape(batch, "sdpa")  # transformers' sdpa: one masked attention over the row
    assert whole_row.blocks == (96,)
    assert analytic.step(per_example)["attention"] < analytic.step(whole_row)["attention"]


def test_rank_pattern_read_as_peft_reads_it():
    """``from_config`` (HF config + LoraConfig, as the planner has them) gives the wrapped model's ranks."""
    from peft import LoraConfig, get_peft_model

    from lora_exp.model.load import load_base_model, resolve_model_folder

    cfg = _compose(*SMALL_VOCAB)
    config = LoraConfig(
        r=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"layers.1.self_attn.q_proj": 32}
    )
    model = get_peft_model(load_base_model(cfg.model, resolve_model_folder(cfg.model)), config).train()
    from_model = flops.from_peft_model(model)
    assert from_model.ranks == ({"q_proj": 8, "v_proj": 8, "down_proj": 8}, {"q_proj": 32, "v_proj": 8, "down_proj": 8})
    assert flops.from_config(model.get_base_model().config, config) == from_model
    batch = _padded(256)
    assert from_model.batch_flops(batch) == pytest.approx(_counted(model, cfg, batch), rel=0.02)


def test_flash_attention_counts_real_lengths_only():
    batch = _padded(256)
    assert flops.batch_shape(batch, "flash_attention_2").blocks == (48, 30, 11)
    assert flops.batch_shape(batch, "sdpa").blocks == (48, 48, 48)
    assert flops.batch_shape(batch, "sdpa").real == 48 + 30 + 11


@pytest.mark.slow
def test_run_records_compute_accounting(tmp_path: Path):
    """A run's metrics.json holds compute/*, and its FLOPs are the analytic count of the batches it trained on."""
    from omegaconf import OmegaConf
    from peft import LoraConfig

    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.model import lora
    from lora_exp.model.load import load_tokenizer, resolve_model_folder
    from lora_exp.planning.planner import build_meta_model

    run_dir = tmp_path / "run"
    train_cli(
        run_dir, "debug=quick", "model=tiny_llama", "logger=none", "trainer.limit_val_batches=0", "loss.impl=chunked"
    )
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        M.COMPUTE_TOKENS_REAL,
        M.COMPUTE_TOKENS_SUPERVISED,
        M.COMPUTE_TRAIN_FLOPS,
        M.COMPUTE_WALL_S,
        M.COMPUTE_DEVICE_HOURS,
        M.COMPUTE_PEAK_MEM_MB,
    ):
        assert m[key] > 0, key
    assert M.COMPUTE_MFU not in m  # a CPU run: no known peak FLOP/s
    assert m[M.COMPUTE_DEVICE_HOURS] == pytest.approx(m[M.COMPUTE_WALL_S] / 3600, rel=1e-3)

    # the same batches, rebuilt from the run's saved config, counted independently (HF config + LoraConfig)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dm = InstructionDataModule(cfg.data, load_tokenizer(resolve_model_folder(cfg.model)), cfg.seed)
    dm.setup("fit")
    batches = [b for _, b in zip(range(m[M.STEPS]), dm.train_dataloader())]
    _, hf_config = build_meta_model(cfg)
    peft_config = lora.peft_config(cfg.lora)
    assert isinstance(peft_config, LoraConfig)
    attn = flops.FASTPATH_ATTENTION if cfg.speed.packed_attention else "sdpa"
    analytic = flops.from_config(
        hf_config, peft_config, loss_impl=cfg.loss.impl, chunk_size=cfg.loss.chunk_size, attn_implementation=attn
    )
    shapes = [flops.batch_shape(b, attn) for b in batches]
    assert m[M.COMPUTE_TOKENS_REAL] == sum(s.real for s in shapes)
    assert m[M.COMPUTE_TOKENS_SUPERVISED] == sum(s.supervised for s in shapes)
    assert m[M.COMPUTE_TRAIN_FLOPS] == sum(analytic.step(s)["total"] for s in shapes)
