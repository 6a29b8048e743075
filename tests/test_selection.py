"""``checkpoint.select=best``: adapter/ holds the best validation's weights; early stopping on the same metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from lora_exp import metrics as M
from lora_exp.training.selection import SelectCheckpoint

# a learning rate far too high for the tiny model: the held-out loss gets worse after the first steps
OVERSHOOT = [
    "model=tiny_llama",
    "debug=quick",
    "logger=none",
    "data.num_train=64",
    "trainer.max_steps=6",
    "trainer.val_check_interval=2",
    "optim.lr=0.5",
    "optim.warmup_steps=0",
]


def _val_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r[M.VAL_LOSS]) for r in rows if M.VAL_LOSS in r]


def test_best_keeps_the_best_step_when_the_last_one_is_worse(tmp_path: Path):
    from omegaconf import OmegaConf
    from peft import PeftModel

    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.model.load import load_base_model, load_tokenizer, resolve_model_folder
    from lora_exp.training.loss import causal_lm_loss

    best, last = tmp_path / "best", tmp_path / "last"
    run_cli("lora_exp.train", *OVERSHOOT, "checkpoint.select=best", f"hydra.run.dir={best}", cwd=tmp_path)
    run_cli("lora_exp.train", *OVERSHOOT, f"hydra.run.dir={last}", cwd=tmp_path)
    record, plain = (json.loads((r / "metrics.json").read_text()) for r in (best, last))
    losses = _val_losses(best)
    assert len(losses) >= 3 and losses[-1][1] > min(v for _, v in losses)  # the run really got worse
    assert record[M.CHECKPOINT_SELECT] == "best" and record[M.FINAL_STEP] == 6
    assert record[M.SELECTED_STEP] < record[M.FINAL_STEP]
    assert record[M.VAL_LOSS] == pytest.approx(min(v for _, v in losses))
    assert record[M.LAST_PREFIX + M.VAL_LOSS] == pytest.approx(plain[M.VAL_LOSS])  # the last step, as select=last
    assert record[M.VAL_LOSS] < plain[M.VAL_LOSS]
    # adapter/ is the selected step's: loaded in plain PEFT it reproduces the recorded (best) val/loss
    cfg = OmegaConf.create(json.loads((best / "run.json").read_text())["config"])
    folder = resolve_model_folder(cfg.model)
    model = PeftModel.from_pretrained(load_base_model(cfg.model, folder), best / "adapter").eval()
    dm = InstructionDataModule(cfg.data, load_tokenizer(folder), cfg.seed)
    dm.setup("validate")
    total = tokens = 0.0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            out = causal_lm_loss(model, batch)
            total, tokens = total + out.loss_sum.item(), tokens + out.n_tokens.item()
    assert total / tokens == pytest.approx(record[M.VAL_LOSS], rel=1e-4)


def test_early_stopping_stops_on_the_same_metric(tmp_path: Path):
    run = tmp_path / "run"
    overrides = [*OVERSHOOT, "trainer.max_steps=40", "trainer.early_stopping.patience=1", "checkpoint.select=best"]
    run_cli("lora_exp.train", *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    record = json.loads((run / "metrics.json").read_text())
    assert record[M.FINAL_STEP] < 40  # stopped by EarlyStopping, not by max_steps
    assert record[M.SELECTED_STEP] <= record[M.FINAL_STEP]


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.last_val: dict[str, float] = {}


@pytest.mark.parametrize(
    ("metric", "values", "best"), [(M.VAL_LOSS, [3, 1, 2], 1), (M.VAL_EXACT_MATCH, [0.2, 0.9, 0.5], 1)]
)
def test_the_selection_follows_the_metrics_direction_and_survives_a_checkpoint(metric, values, best):
    module, sel = _Module(), SelectCheckpoint(metric, "best")
    for step, v in enumerate(values):
        module.w.data.fill_(step)
        module.last_val = {metric: v}
        sel.consider(module, step)
    restored = SelectCheckpoint(metric, "best")
    restored.load_state_dict(sel.state_dict())  # what a checkpoint keeps, for a resumed run
    assert restored.restore_best(module) and restored.best_step == best
    assert module.w.tolist() == [best, best]
    assert restored.record(len(values) - 1, {metric: values[-1]})[M.SELECTED_STEP] == best
    assert not SelectCheckpoint(metric, "last").restore_best(module)
