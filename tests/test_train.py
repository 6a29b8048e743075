"""End to end through the public CLI: run directory contents, plain-PEFT reload, clear failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_SGD_STEP, run_cli, train_cli
from lora_exp import metrics as M

pytestmark = pytest.mark.slow


def test_default_run_leaves_a_complete_run_directory(default_run: Path):
    m = json.loads((default_run / "metrics.json").read_text())
    assert m[M.STATUS] == M.STATUS_COMPLETED
    assert m[M.STEPS] == 8 and m[M.TRAINABLE_PARAMS] == 1_843_200 and m[M.TOTAL_PARAMS] == 136_358_208
    for key in (*M.VAL_METRICS, *(M.base(k) for k in M.VAL_METRICS), M.TRAIN_TOKENS_PER_S, M.LORA_SCALING):
        assert isinstance(m[key], float), key
    assert m[M.TRAIN_TOKENS_PER_S] > 0
    assert m[M.VAL_LOSS] < m[M.base(M.VAL_LOSS)]  # 8 steps already move the held-out loss
    assert (default_run / ".hydra" / "config.yaml").is_file()
    assert (default_run / "adapter" / "adapter_config.json").is_file()
    assert (default_run / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoints_hold_only_trainable_state(default_run: Path):
    ckpt = torch.load(default_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"]
    base_bytes = (
        (
            Path(json.loads((default_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"])
            / "model.safetensors"
        )
        .stat()
        .st_size
    )
    assert (default_run / "checkpoints" / "last.ckpt").stat().st_size < 0.1 * base_bytes


def test_adapter_reloads_in_plain_peft_with_the_trained_logits(default_run: Path):
    """``AutoPeftModelForCausalLM`` on adapter/ alone (offline) reproduces the run's held-out loss."""
    from omegaconf import OmegaConf
    from peft import AutoPeftModelForCausalLM

    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.model.load import load_tokenizer
    from lora_exp.training.loss import causal_lm_loss

    adapter = default_run / "adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path).is_dir()  # a real local folder, not a hub id
    recorded = json.loads((default_run / "metrics.json").read_text())
    dtype = getattr(torch, recorded["precision/model_dtype"])  # what `auto` picked for the run on this machine
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=dtype).eval()
    cfg = OmegaConf.load(default_run / ".hydra" / "config.yaml")
    dm = InstructionDataModule(cfg.data, load_tokenizer(base_path), cfg.seed)
    dm.setup("validate")
    loss_sum = tokens = 0.0
    base_sum = 0.0
    autocast = recorded["precision/trainer"] == "bf16-mixed"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for batch in dm.val_dataloader():
            out = causal_lm_loss(model, batch)
            loss_sum += out.loss_sum.item()
            tokens += out.n_tokens.item()
            with model.disable_adapter():
                base_sum += causal_lm_loss(model, batch).loss_sum.item()
    assert loss_sum / tokens == pytest.approx(recorded[M.VAL_LOSS], rel=1e-3)
    assert base_sum / tokens == pytest.approx(recorded[M.base(M.VAL_LOSS)], rel=1e-3)
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_overrides_reach_the_run_and_evaluation_can_be_turned_off(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = train_cli(
        run_dir,
        "model=tiny_llama",
        "debug=quick",
        "lora.r=32",
        "lora.alpha=8",
        "lora.dropout=0.1",
        "lora.target_modules=qv",
        "seed=5",
        "optim.lr=3e-4",
        "trainer.max_steps=3",
        "trainer.precision=32-true",
        "trainer.limit_val_batches=0",
        "logger=none",
    )
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m[M.STATUS] == M.STATUS_COMPLETED and m[M.STEPS] == 3
    assert m[M.LORA_SCALING] == 0.25 and m["lora/target_modules"] == ["q_proj", "v_proj"]
    assert not any(k.startswith("val/") or k.startswith("base/") for k in m)
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["lora_dropout"]) == (32, 8, 0.1)
    assert sorted(adapter_cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert "trainable params:" in proc.stdout


def test_wandb_logs_offline_into_the_run_directory(tiny_run: Path):
    runs = list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert json.loads((tiny_run / "metrics.json").read_text())[M.STATUS] == M.STATUS_COMPLETED


def test_cli_prints_config_and_help_from_any_directory(tmp_path: Path):
    started = time.perf_counter()
    job = run_cli("lora_exp.train", "--cfg", "job", "lora.r=32", cwd=tmp_path)
    assert time.perf_counter() - started < 60  # generous: this only guards against loading models
    assert "r: 32" in job.stdout and "smollm2_135m" in job.stdout
    helped = run_cli("lora_exp.train", "--help", cwd=tmp_path).stdout
    for group in ("model:", "lora:", "data:", "optim:", "trainer:", "logger:", "callbacks:", "debug:", "experiment:"):
        assert group in helped


def test_invalid_values_are_listed_at_once_without_traceback(tmp_path: Path):
    proc = train_cli(tmp_path / "run", "lora.r=0", "lora.dropout=1.5", "optim.lr=-1", check=False)
    assert proc.returncode == 2
    for key in ("lora.r=0", "lora.dropout=1.5", "optim.lr=-1"):
        assert key in proc.stderr
    assert "Traceback" not in proc.stderr


def test_llama_without_hub_access_fails_fast_with_what_to_do(tmp_path: Path):
    started = time.perf_counter()
    proc = train_cli(tmp_path / "run", "model=llama3_1_8b", check=False, env={"HF_TOKEN": ""})
    assert proc.returncode == 2 and time.perf_counter() - started < 120
    assert "meta-llama/Llama-3.1-8B" in proc.stderr and "HF_TOKEN" in proc.stderr and "model.path" in proc.stderr
    assert "Traceback" not in proc.stderr
    status = json.loads((tmp_path / "run" / "metrics.json").read_text())[M.STATUS]
    assert status == M.STATUS_FAILED  # nothing that looks like a finished run


def test_gradient_accumulation_weights_every_token_equally(tmp_path: Path):
    """Batch 4 x accumulate 2 makes the same SGD step as batch 8, though its micro-batches differ in length.

    Averaging each micro-batch's mean loss (Lightning's default) would weight the tokens of the
    shorter micro-batch more (transformers#34191); the run divides by the window's tokens instead.
    """
    from safetensors.torch import load_file

    from conftest import compose
    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.data.templating import IGNORE_INDEX
    from lora_exp.model.load import load_tokenizer, resolve_model_folder

    counts = [" ".join(str(i) for i in range(1, n + 1)) for n in range(1, 17)]
    records = [{"prompt": f"Count to {n}.", "response": text} for n, text in enumerate(counts, 1)]
    train_path = tmp_path / "train.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = [
        "model=tiny_llama",
        "data=jsonl",
        f"data.train_path={train_path}",
        f"data.val_path={train_path}",
        "data.shuffle=false",  # the short examples come first: the two micro-batches differ in length
        *ONE_SGD_STEP,
    ]
    full = tmp_path / "batch8"
    micro = tmp_path / "batch4x2"
    train_cli(full, *common, "data.batch_size=8")
    train_cli(micro, *common, "data.batch_size=4", "trainer.accumulate_grad_batches=2")

    cfg = compose(*common, "data.batch_size=4")
    data = InstructionDataModule(cfg.data, load_tokenizer(resolve_model_folder(cfg.model)), cfg.seed)
    data.setup("fit")
    first, second = data._train_batches([len(r["input_ids"]) for r in data.train_rows])[:2]
    supervised = [sum(t != IGNORE_INDEX for i in b for t in data.train_rows[i]["labels"][1:]) for b in (first, second)]
    assert supervised[0] != supervised[1], "micro-batches of equal token counts would not tell the two apart"

    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(micro / "adapter" / "adapter_model.safetensors")
    moved = [k for k in a if "lora_B" in k]
    assert moved and all(a[k].abs().max() > 0 for k in moved)  # lora_B starts at zero: the step moved it
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
