"""Bad input: one error listing every problem, exit status 2, no traceback (unless HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import pytest

from conftest import compose, train_cli
from lora_exp.config.validate import override_problems, validate
from lora_exp.errors import ConfigError


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(compose("model=tiny_llama", *overrides))
    return e.value.problems


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.r=0", "lora.r=0: must be >= 1"),
        ("lora.r=2.5", "lora.r=2.5: expected an integer"),
        ("lora.alpha=0", "lora.alpha=0: must be > 0"),
        ("lora.dropout=1", "lora.dropout=1: must be < 1"),
        ("lora.dropout=-0.1", "lora.dropout=-0.1: must be >= 0"),
        ("data.max_seq_len=0", "data.max_seq_len=0: must be >= 1"),
        ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
        ("optim.lr=0", "optim.lr=0: must be > 0"),
        ("optim.lr=fast", "optim.lr='fast': expected a number"),
        ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps=0: must be >= 1"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be >= 1"),
        ("trainer.precision=8-mixed", "trainer.precision='8-mixed'"),
        ("resume=maybe", "resume='maybe': expected true or false"),
        ("speed.lora_dropout=no_thanks", "speed.lora_dropout='no_thanks': expected true or false"),
        ("model.path=/nonexistent/model", "model.path=/nonexistent/model: not an HF model folder"),
        ("data=jsonl data.train_path=/nonexistent/train.jsonl", "data.train_path=/nonexistent/train.jsonl"),
        ("lora.target_modules=[]", "lora.target_modules is empty"),
        ("quant.mode=int3", "quant.mode='int3'"),
        ("+logger.csv.api_key=abc123", "logger.csv.api_key: looks like a secret"),
        (
            "optim.optimizer._target_=torch.optim.AdamWW",
            "optim.optimizer._target_=torch.optim.AdamWW: cannot import it (ModuleNotFoundError",
        ),
        ("+callbacks.mine._target_=no_such_pkg.Cb", "callbacks.mine._target_=no_such_pkg.Cb: cannot import it"),
        ("optim.scheduler._target_=math.pi", "optim.scheduler._target_=math.pi: imports, but is a float"),
        ("loss.impl=fastest", "loss.impl='fastest': expected one of"),
        ("model.dtype=int4", "model.dtype='int4': expected one of"),
        ("model.compile=maybe", "model.compile='maybe': expected true or false"),
        ("trainer.devices=0", "trainer.devices=0: must be >= 1"),
        ("optim.warmup_ratio=1.5", "optim.warmup_ratio=1.5: must be <= 1"),
    ],
)
def test_each_bad_value_is_named(override, message):
    found = problems(*override.split())
    assert any(message in p for p in found), found


def test_secret_values_are_never_echoed(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    found = problems(f"+logger.csv.note={'k' * 40}", "+data.hf_token=hf_abcdefgh")
    assert len(found) == 2 and not any("kkkk" in p or "hf_abc" in p for p in found)


def test_unknown_options_and_keys_are_listed_together():
    found = override_problems(["model=nope", "data=jsonl,nada", "lora.rr=3", "trainer.max_stepz=1", "lora.r=4"])
    assert len(found) == 4
    assert found[0].startswith("model=nope: no such option") and "tiny_llama" in found[0]
    assert found[1].startswith("data=nada: no such option")
    assert "lora.rr: no such config key" in found[2] and "'r'" in found[2]
    assert override_problems(["model=tiny_llama", "+lora.extra=1", "hydra.run.dir=x", "lora.r=4"]) == []


def test_cli_reports_everything_at_once_with_exit_2(tmp_path):
    proc = train_cli(tmp_path / "a", "model=nope", "lora.rr=3", check=False)
    assert proc.returncode == 2 and proc.stderr.count("  - ") == 2 and "Traceback" not in proc.stderr
    proc = train_cli(tmp_path / "b", "model=tiny_llama", "lora.r=0", "optim.lr=-1", "data.batch_size=0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert all(k in proc.stderr for k in ("lora.r=0", "optim.lr=-1", "data.batch_size=0"))
    assert not (tmp_path / "b" / "adapter").exists()  # rejected before any weight was loaded
    proc = train_cli(tmp_path / "c", "model=tiny_llama", "lora.r=0", env={"HYDRA_FULL_ERROR": "1"}, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_target_modules_are_checked_against_the_real_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_exp.model.lora import wrap

    cfg = compose("model=tiny_llama", "lora.target_modules=[q_proj,qkv_proj]")
    model = LlamaForCausalLM(LlamaConfig(**{**dict(cfg.model.config), "vocab_size": 64}))
    with torch.no_grad(), pytest.raises(ConfigError) as e:
        wrap(model, cfg.lora)
    assert "['qkv_proj'] not found" in str(e.value) and "'v_proj'" in str(e.value)
