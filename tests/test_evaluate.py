"""``lora_exp.evaluate``: reproduces a run's own held-out metrics; several adapters on one base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, train_cli
from lora_exp import metrics as M


@pytest.fixture(scope="module")
def tiny_run_seed1(tmp_path_factory) -> Path:
    """A second tiny run, another seed (another LoRA init and data order), same base."""
    run_dir = tmp_path_factory.mktemp("tiny_seed1") / "run_seed1"
    train_cli(run_dir, "model=tiny_llama", "debug=quick", "logger=none", "seed=1", "optim.lr=1e-2")
    return run_dir


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_several_adapters_reproduce_their_own_val_loss(tiny_run: Path, tiny_run_seed1: Path, tmp_path: Path):
    """run_dir=[A,B]: one table, each adapter's eval.json matches the val metrics its run recorded."""
    proc = run_cli("lora_exp.evaluate", f"run_dir=[{tiny_run},{tiny_run_seed1}]", cwd=tmp_path)
    assert "run" in proc.stdout and "run_seed1" in proc.stdout and "base" in proc.stdout
    for run_dir, name in ((tiny_run, "run"), (tiny_run_seed1, "run_seed1")):
        got = json.loads((run_dir / "eval.json").read_text())
        want = _metrics(run_dir)
        assert got["adapter"] == name and got["split"] == "val"
        for key in M.VAL_METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
            assert got[M.base(key)] == pytest.approx(want[M.base(key)], rel=1e-6, abs=1e-6), key
        assert got["recorded/" + M.VAL_LOSS] == want[M.VAL_LOSS]
    a, b = (json.loads((d / "eval.json").read_text())[M.VAL_LOSS] for d in (tiny_run, tiny_run_seed1))
    assert a != b  # each adapter was really switched in
    assert not list(tmp_path.iterdir())  # nothing written to the working directory


def test_data_overrides_apply_on_top_of_the_run_data(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "table.json"
    proc = run_cli(
        "lora_exp.evaluate", f"run_dir={tiny_run}", "data.num_val=5", "base=false", f"out={out}", cwd=tmp_path
    )
    table = json.loads(out.read_text())
    assert table["examples"] == 5 and table["data"]["num_val"] == 5 and list(table["rows"]) == ["run"]
    assert "recorded in metrics.json" not in proc.stdout  # other data: nothing to compare with


def test_data_file_holding_the_run_val_split_gives_its_val_loss(tiny_run: Path, tmp_path: Path):
    """data_file=FILE renders a local file like training did; out= gets the whole table."""
    from lora_exp.data.tasks import generate

    _, val = generate("json_extract", 0, 16, 0)  # the tiny run's held-out examples (debug=quick)
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(example) + "\n" for example in val))
    out = tmp_path / "table.json"
    run_cli("lora_exp.evaluate", f"run_dir={tiny_run}", f"data_file={data}", "base=false", f"out={out}", cwd=tmp_path)
    table = json.loads(out.read_text())
    assert table["examples"] == 16 and table["data"]["val_path"] == str(data)
    assert list(table["rows"]) == ["run"]
    assert table["rows"]["run"][M.VAL_LOSS] == pytest.approx(_metrics(tiny_run)[M.VAL_LOSS], rel=1e-6)


def test_switching_adapters_gives_each_adapter_its_own_logits(tiny_run: Path, tiny_run_seed1: Path):
    """Adapters loaded by name onto one base, switched in place, equal each adapter loaded alone."""
    from peft import PeftModel

    from lora_exp.inference import session as inference

    runs = inference.load_runs([str(tiny_run), str(tiny_run_seed1)])
    folder = inference.check_same_base(runs)
    model = inference.attach_adapters(inference.load_base(runs[0], folder), runs)
    base_weight = model.get_base_model().model.embed_tokens.weight
    ids = torch.tensor([[1, 400, 5000, 77, 9, 12000, 3]])

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits

    switched = {}
    for run in runs:
        model.set_adapter(run.name)
        switched[run.name] = logits(model)
    with model.disable_adapter():
        base_logits = logits(model)
    assert model.get_base_model().model.embed_tokens.weight is base_weight  # the base was never reloaded

    for run in runs:
        alone = PeftModel.from_pretrained(inference.load_base(run, folder), str(run.adapter_dir)).eval()
        torch.testing.assert_close(switched[run.name], logits(alone), rtol=0, atol=1e-6)
    assert not torch.allclose(switched["run"], switched["run_seed1"])
    assert not torch.allclose(switched["run"], base_logits)


HARNESS_TASK = """task: json_records
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def test_harness_scores_the_adapter_not_the_bare_base(tiny_run: Path, tmp_path: Path):
    """A local lm-eval task scores base and adapter differently: the adapter is really applied."""
    pytest.importorskip("lm_eval")
    from omegaconf import OmegaConf

    from lora_exp.data.tasks import generate
    from lora_exp.inference import session as inference
    from lora_exp.inference.evaluate import harness_scores
    from lora_exp.model.load import load_tokenizer

    _, val = generate("json_extract", 0, 4, 0)
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"text": ex["messages"][1]["content"]}) + "\n" for ex in val))
    (tmp_path / "json_records.yaml").write_text(HARNESS_TASK.format(data=data))
    runs = inference.load_runs(str(tiny_run))
    folder = inference.base_folder(runs[0])
    model = inference.attach_adapters(inference.load_base(runs[0], folder), runs)
    cfg = OmegaConf.create(
        {
            "base": True,
            "harness": {
                "tasks": ["json_records"],
                "include_path": str(tmp_path),
                "limit": None,
                "num_fewshot": None,
                "batch_size": 4,
            },
        }
    )
    rows = harness_scores(model, load_tokenizer(folder), runs, cfg)
    key = "harness/json_records/bits_per_byte"
    assert set(rows) == {"base", "run"} and rows["base"][key] > 0
    assert rows["run"][key] != pytest.approx(rows["base"][key], rel=1e-6)


def test_bad_run_dir_is_one_clear_error(tmp_path: Path):
    proc = run_cli("lora_exp.evaluate", f"run_dir={tmp_path / 'missing'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"lora_exp.evaluate: error: run_dir={tmp_path / 'missing'}: no such directory"
    ]
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)
    (tmp_path / "unfinished" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    proc = run_cli("lora_exp.evaluate", f"run_dir={tmp_path / 'unfinished'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "adapter/adapter_config.json" in proc.stderr


@pytest.mark.slow
def test_default_model_evaluation_reproduces_the_run(default_run: Path, tmp_path: Path):
    """The run's own precision (what `auto` picked on this machine): the recorded val/loss comes back to 1e-4."""
    run_cli("lora_exp.evaluate", f"run_dir={default_run}", cwd=tmp_path)
    got, want = json.loads((default_run / "eval.json").read_text()), _metrics(default_run)
    assert got["precision"] == want["precision/trainer"]
    for key in (M.VAL_LOSS, M.base(M.VAL_LOSS)):
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    assert got[M.VAL_EXACT_MATCH] == pytest.approx(want[M.VAL_EXACT_MATCH])
    assert got[M.VAL_LOSS] < got[M.base(M.VAL_LOSS)]
