"""Distributed strategies: DDP on 2 CPU processes (gloo) through the public CLI; FSDP/DeepSpeed configs."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ONE_SGD_STEP, compose, run_cli
from lora_exp import metrics as M
from lora_exp.training import distributed


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory):
    """A one-point multirun with 2 DDP processes, from a fresh working directory, default output paths.

    A multirun is the hard case: Lightning's own child command would repeat ``-m`` and point the
    children at ``hydra.run.dir`` (a fresh timestamp) instead of the job's folder.
    """
    cwd = tmp_path_factory.mktemp("ddp")
    proc = run_cli(
        "lora_exp.train",
        "-m",
        "model=tiny_llama",
        "debug=quick",
        "logger=wandb",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "seed=0",
        cwd=cwd,
    )
    return cwd, proc


def test_ddp_two_processes_one_run_dir_one_adapter_one_wandb_run(ddp_sweep):
    cwd, proc = ddp_sweep
    outputs = cwd / "outputs"
    job_dirs = [p.parent for p in outputs.rglob("metrics.json")]
    assert len(job_dirs) == 1, f"expected one run directory, found {job_dirs}"
    assert not (outputs / "runs").exists(), "a rank re-ran Hydra into a run directory of its own"
    run_dir = job_dirs[0]
    assert run_dir.name == "0" and (run_dir / ".hydra" / "config.yaml").is_file()

    record = json.loads((run_dir / "metrics.json").read_text())
    assert record[M.STATUS] == M.STATUS_COMPLETED
    assert record[M.WORLD_SIZE] == 2
    # 32 training examples, batch 8, 2 ranks: 2 optimizer steps, every token counted once
    assert record[M.STEPS] == 2
    assert record[M.TRAIN_TOKENS] > 0
    assert record[M.VAL_LOSS] < record[M.base(M.VAL_LOSS)]

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, f"expected one W&B run, found {wandb_runs}"
    assert wandb_runs[0].name.endswith(record[M.WANDB_RUN_ID])
    assert proc.stdout.count("trainable params:") == 1, "ranks > 0 must not print the run summary"


def test_ddp_adapter_loads_in_plain_peft(ddp_sweep):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cwd, _ = ddp_sweep
    adapter = next(cwd.rglob("adapter_config.json")).parent
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(torch.count_nonzero(p) > 0 for p in b), "the saved adapter did not train"


def test_ddp_with_packing_splits_the_packed_batches_across_ranks(tmp_path):
    """Packed batches under DDP: each rank trains every other batch of the same seeded order.

    The summed real tokens of both ranks equal the tokens of the first 2 x steps batches exactly,
    so no batch was trained twice and none was skipped (except the odd one out at the end).
    """
    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.model.load import load_tokenizer, resolve_model_folder

    overrides = ["model=tiny_llama", "debug=quick", "data.packing=true", "data.pack_tokens=512", "trainer.max_steps=-1"]
    run_dir = tmp_path / "run"
    run_cli(
        "lora_exp.train",
        *overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    record = json.loads((run_dir / "metrics.json").read_text())
    cfg = compose(*overrides, run_dir=tmp_path)
    data = InstructionDataModule(cfg.data, load_tokenizer(resolve_model_folder(cfg.model)), cfg.seed)
    data.setup("fit")
    lengths = [len(r["input_ids"]) for r in data.train_rows]
    batches = data._train_batches(lengths)
    steps = len(batches) // 2
    assert len(batches) >= 4 and record[M.WORLD_SIZE] == 2 and record[M.STATUS] == M.STATUS_COMPLETED
    assert record[M.STEPS] == steps
    assert record[M.TRAIN_TOKENS] == sum(lengths[i] for b in batches[: 2 * steps] for i in b)


def test_ddp_step_equals_one_process_accumulating_the_same_batches(tmp_path):
    """2 ranks x 1 packed batch == 1 process x 2 packed batches accumulated: token-weighted over ranks.

    With packing, rank r trains batches r, r + 2, ...; one process with accumulate 2 sees batches
    0 and 1 in its first step too. SGD in fp32 without clipping makes the step the gradient itself.
    """
    from safetensors.torch import load_file

    common = [
        "model=tiny_llama",
        "debug=quick",
        "data.packing=true",
        "data.pack_tokens=512",
        *ONE_SGD_STEP,
    ]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp_args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    run_cli("lora_exp.train", *common, *ddp_args, f"hydra.run.dir={ddp}", cwd=tmp_path)
    run_cli("lora_exp.train", *common, "trainer.accumulate_grad_batches=2", f"hydra.run.dir={single}", cwd=tmp_path)
    a = load_file(ddp / "adapter" / "adapter_model.safetensors")
    b = load_file(single / "adapter" / "adapter_model.safetensors")
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_child_command_repeats_the_job_not_the_sweep(tmp_path, monkeypatch):
    """The rank > 0 command: this job's overrides, its output directory, no ``-m``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.create(
        {
            "runtime": {"output_dir": str(tmp_path / "sweep" / "3"), "config_sources": []},
            "job": {"config_name": "train", "name": "train"},
            "overrides": {
                "task": ["lora.r=8", "trainer=ddp"],
                "hydra": ["hydra.mode=MULTIRUN", "hydra.sweep.dir=x", "hydra.job.chdir=false"],
            },
        }
    )
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    monkeypatch.setattr("hydra.utils.get_original_cwd", lambda: str(tmp_path))
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", SimpleNamespace(name="lora_exp.train"), raising=False)
    command, cwd = distributed.child_command(local_rank=1)
    run_dir = tmp_path / "sweep" / "3"
    assert command == [
        sys.executable,
        "-m",
        "lora_exp.train",
        "--config-name=train",
        "lora.r=8",
        "trainer=ddp",
        "hydra.job.chdir=false",
        f"hydra.run.dir='{run_dir}'",
        "hydra.job.name=train_rank1",
        "hydra.output_subdir=null",
    ]
    assert cwd == str(tmp_path)


@pytest.mark.parametrize("option", ["ddp", "fsdp", "deepspeed"])
def test_distributed_trainer_configs_compose(option, tmp_path):
    cfg = compose(f"trainer={option}", run_dir=tmp_path)
    assert cfg.trainer.devices == "auto"
    assert distributed.is_fsdp(cfg.trainer) == (option == "fsdp")
    if option == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        strategy = distributed.trainer_kwargs(cfg.trainer)["strategy"]
        assert isinstance(strategy, FSDPStrategy)
        assert strategy.kwargs["use_orig_params"] is True  # frozen base + trainable LoRA in one flat param
        assert LlamaDecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes


def test_qlora_under_fsdp_stores_4bit_weights_in_the_model_dtype(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lora_exp.model.quant import bnb_config

    cfg = compose("quant=nf4", "trainer=fsdp", run_dir=tmp_path)
    assert bnb_config(cfg.quant, fsdp=True, model_dtype="bfloat16").bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(cfg.quant).bnb_4bit_quant_storage == torch.uint8


needs_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@needs_gpus
@pytest.mark.parametrize("option", ["ddp", "fsdp", "deepspeed"])
def test_distributed_strategies_on_gpus(option, tmp_path):
    if option == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    run_dir = tmp_path / "run"
    run_cli(
        "lora_exp.train",
        "model=tiny_llama",
        "debug=quick",
        f"trainer={option}",
        "trainer.devices=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record[M.STATUS] == M.STATUS_COMPLETED and record[M.WORLD_SIZE] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
