"""``python -m lora_exp.paper``: tables, figures, numbers.tex, manifest.json, --check and the model card.

Most tests read synthetic run directories written as a Hydra multirun writes them (``test_stats``'
helpers), so every number can be computed independently here; one reads a real tiny sweep.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from conftest import ROOT, run_cli
from lora_exp import metrics as M
from lora_exp import paper as paper_cmd
from lora_exp.reporting import modelcard, numbers
from lora_exp.reporting.manifest import MANIFEST_FILE
from test_stats import write_sweep

NEWCOMMAND = re.compile(r"^\\newcommand\{\\([^}]*)\}\{(.*)\}$", re.M)
COMPUTE = {M.COMPUTE_TRAIN_FLOPS: 2.5e12, M.COMPUTE_DEVICE_HOURS: 0.125}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def macros(out: Path) -> dict[str, str]:
    return dict(NEWCOMMAND.findall((out / "numbers.tex").read_text()))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """r=4 vs r=8 (better by 0.2), 5 shared seeds; run.json and an adapter config in every run."""
    root = write_sweep(tmp_path / "sweep", {4: 1.0, 8: 0.8}, noise=0.02, **COMPUTE)
    for run in root.iterdir():
        (run / "run.json").write_text(json.dumps({"command": ["python", "-m", "lora_exp.train", "-m"], "git": {}}))
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text(
            json.dumps({"r": 4, "lora_alpha": 16, "peft_type": "LORA"})
        )
    return root


def build(sweep: Path, out: Path, *extra: str) -> int:
    return paper_cmd.main([str(sweep), "--out", str(out), *extra])


def values(sweep: Path, r: int) -> tuple[list[int], list[float]]:
    runs = [json.loads((d / "metrics.json").read_text()) | {"_d": d} for d in sorted(sweep.iterdir())]
    pairs = sorted((yaml.safe_load((x["_d"] / ".hydra/config.yaml").read_text())["seed"], x[M.VAL_LOSS])
                   for x in runs if x[M.TRAINABLE_PARAMS] == 1024 * r)  # fmt: skip
    return [s for s, _ in pairs], [v for _, v in pairs]


def test_paper_folder_holds_tables_figures_numbers_and_a_manifest(sweep, tmp_path):
    out = tmp_path / "paper"
    assert build(sweep, out) == 0
    results = (out / "tables/results.tex").read_text()
    assert "\\toprule" in results and "\\textbf{" in results and "dagger" in results
    assert "\\midrule" in (out / "tables/comparisons.tex").read_text()
    assert "\\bottomrule" in (out / "tables/compute.tex").read_text()
    pdfs, pngs = sorted((out / "figures").glob("*.pdf")), sorted((out / "figures").glob("*.png"))
    assert {p.stem for p in pdfs} == {p.stem for p in pngs} >= {"configurations", "loss_vs_rank", "loss_curves"}
    assert all(p.read_bytes().startswith(b"%PDF") for p in pdfs)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)

    cited = macros(out)
    assert all(re.fullmatch(r"[A-Za-z]+", name) for name in cited)  # LaTeX control words: letters only
    assert len(cited) == len(NEWCOMMAND.findall((out / "numbers.tex").read_text()))  # none defined twice
    _, best = values(sweep, 8)
    seeds, worse = values(sweep, 4)
    assert cited["BestValLossConfig"].startswith("r=8")
    assert cited["BestValLossMean"] == f"{np.mean(best):.4f}"
    half = sps.t.ppf(0.975, 4) * np.std(best, ddof=1) / np.sqrt(5)
    assert cited["BestValLossCILow"] == f"{np.mean(best) - half:.4f}"
    assert cited["BestValLossCIHigh"] == f"{np.mean(best) + half:.4f}"
    # r=4 is row A: significantly worse, by a paired t-test over the shared seeds; Holm over 1 pair
    p = sps.ttest_rel(worse, best).pvalue
    assert cited["ValLossConfigAVsBestSignificant"] == "yes"
    assert cited["ValLossConfigAVsBestDiff"] == f"{np.mean(worse) - np.mean(best):.4f}"
    assert cited["ValLossConfigAVsBestP"] == numbers.latex_p(p)
    assert cited["TotalTrainFlops"] == numbers.latex_sci(10 * 2.5e12) == r"\ensuremath{2.50\times10^{13}}"
    assert cited["TotalDeviceHours"] == "1.250"
    readme = (out / "README.md").read_text()
    assert all(f"`\\{name}`" in readme for name in cited)  # every macro listed with its meaning

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["command"][:3] == ["python", "-m", "lora_exp.paper"]
    assert manifest["lora_exp_version"] and "git_commit" in manifest
    assert len(manifest["runs"]) == 10
    for run_dir, entry in manifest["runs"].items():
        assert set(entry["files"]) == {"metrics.json", "run.json", ".hydra/config.yaml", ".hydra/overrides.yaml",
                                       "history.jsonl"}  # fmt: skip
        assert all(sha256(Path(run_dir) / name) == h for name, h in entry["files"].items())
    assert {"numbers.tex", "README.md", "tables/results.tex", "figures/configurations.pdf"} <= set(manifest["outputs"])
    assert all(sha256(out / name) == h for name, h in manifest["outputs"].items())


def test_check_passes_then_names_each_changed_missing_or_new_file(sweep, tmp_path, capsys):
    out = tmp_path / "paper"
    assert build(sweep, out) == 0
    assert paper_cmd.main(["--check", "--out", str(out)]) == 0
    capsys.readouterr()
    edited = sweep / "3" / "metrics.json"  # job 3: r=4, seed 3
    record = json.loads(edited.read_text())
    edited.write_text(json.dumps({**record, M.VAL_LOSS: record[M.VAL_LOSS] + 0.001}))
    (sweep / "6" / "run.json").unlink()
    assert paper_cmd.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"lora_exp.paper --check: changed: {edited.resolve()} (run r=4, alpha=16, target_modules=qv, seed 3)" in err
    missing = sweep / "6" / "run.json"  # job 6: r=8, seed 1
    assert f"lora_exp.paper --check: missing: {missing.resolve()} (run r=8, alpha=16, target_modules=qv, seed 1)" in err
    assert len(err) == 2

    write_sweep(sweep / "more", {8: 0.8}, seeds=[9])  # a new seed appeared in the sweep since
    (out / "numbers.tex").write_text((out / "numbers.tex").read_text() + "% by hand\n")
    assert paper_cmd.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"new run not in the manifest: {(sweep / 'more' / '0').resolve()}" in err
    assert f"changed: {out.resolve() / 'numbers.tex'}" in err


def test_check_without_manifest_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for argv in (["--check", "--out", str(tmp_path)], ["--check"], [str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            paper_cmd.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("lora_exp.paper: error:") and err.count("\n") == 1


def test_out_never_replaces_what_paper_did_not_write(sweep, tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter.tex").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        build(sweep, mine, "--overwrite")
    assert exit_info.value.code == 2 and "no .lora-exp-paper" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["chapter.tex"]
    with pytest.raises(SystemExit):  # a run directory (or a folder holding one) is never an output
        build(sweep, sweep)
    out = tmp_path / "paper"
    assert build(sweep, out) == 0
    with pytest.raises(SystemExit) as exit_info:
        build(sweep, out)  # a previous output: only with --overwrite
    assert exit_info.value.code == 2 and "pass --overwrite to replace it" in capsys.readouterr().err
    assert build(sweep, out, "--overwrite") == 0
    assert paper_cmd.main(["--check", "--out", str(out)]) == 0
    assert not list(tmp_path.glob(".paper.*"))  # no temporary folder left behind


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_is_hub_format_with_cis_and_never_replaces_a_users_readme(sweep, tmp_path, capsys):
    run = sweep / "5"  # r=8, seed 0
    card = run / "adapter" / "README.md"
    from huggingface_hub import ModelCard, ModelCardData

    blank = (
        ModelCard.from_template(ModelCardData(library_name="peft")).content
        + "\n### Framework versions\n\n- PEFT 0.21.2\n"
    )
    card.write_text(blank)  # what PEFT's save_pretrained leaves: replaced
    assert paper_cmd.main([str(sweep), "--model-card", str(run)]) == 0
    text = card.read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "## LoRA configuration" in text and '`"LORA"`' in text
    _, best = values(sweep, 8)
    assert f"{np.mean(best):.4f} ± {np.std(best, ddof=1):.4f}" in text  # the configuration's 5 seeds
    assert "python -m lora_exp.reproduce" in text and "@software{lora_exp," in text
    assert paper_cmd.main(["--model-card", str(run)]) == 0  # our own card: rewritten (no sweep: no CI)
    assert "This run only" in card.read_text()

    card.write_text("# My adapter\n\nHand-written notes.\n")
    with pytest.raises(SystemExit) as exit_info:
        paper_cmd.main(["--model-card", str(run)])
    assert exit_info.value.code == 2 and "never replaced" in capsys.readouterr().err
    assert card.read_text() == "# My adapter\n\nHand-written notes.\n"


def test_model_card_licenses_and_base_model_of_a_hub_model():
    meta = yaml.safe_load(modelcard.front_matter({}, "meta-llama/Llama-3.1-8B").strip("-\n"))
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B" and meta["license"] == "llama3.1"
    assert "base_model:adapter:meta-llama/Llama-3.1-8B" in meta["tags"]


def test_macro_names_are_letters_only():
    assert numbers.macro_name("Best", "val/loss", "Mean") == "BestValLossMean"
    assert numbers.macro_name("val/probe2/exact_match") == "ValProbeTwoExactMatch"
    assert [numbers.letter(i) for i in (0, 25, 26, 27)] == ["A", "Z", "AA", "AB"]
    assert numbers.latex_escape("target_modules=q_proj&v") == r"target\_modules=q\_proj\&v"


def test_citation_cff_is_valid_cff_1_2():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    from lora_exp import __version__

    assert cff["cff-version"] == "1.2.0" and cff["message"] and cff["title"]
    assert cff["authors"] == [{"name": "lora-exp developers"}]  # an entity: `name`, not family-names
    assert cff["version"] == __version__ and cff["license"] == "MIT"
    assert set(cff) <= {"cff-version", "message", "type", "title", "abstract", "authors", "version", "license",
                        "keywords", "repository-code", "url", "date-released", "doi", "preferred-citation"}  # fmt: skip


@pytest.mark.slow
def test_paper_of_a_real_tiny_sweep(tmp_path):
    sweep = tmp_path / "multirun"
    run_cli("lora_exp.train", "-m", "model=tiny_llama", "debug=quick", "logger=none", "lora.r=4,8", "seed=0,1",
            f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    out = tmp_path / "paper"
    run_cli("lora_exp.paper", str(sweep), "--out", str(out), "--model-card", str(sweep / "0"), cwd=tmp_path)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert len(manifest["runs"]) == 4 and manifest["command"][:3] == ["python", "-m", "lora_exp.paper"]
    assert all(sha256(Path(d) / n) == h for d, e in manifest["runs"].items() for n, h in e["files"].items())
    assert all((out / f"figures/configurations.{ext}").is_file() for ext in ("pdf", "png"))
    assert (out / "figures/configurations.pdf").read_bytes().startswith(b"%PDF")
    cited = macros(out)
    assert all(re.fullmatch(r"[A-Za-z]+", n) for n in cited) and {"BestValLossMean", "TotalTrainFlops"} <= set(cited)
    meta = _front_matter((sweep / "0" / "adapter" / "README.md").read_text())
    assert meta["library_name"] == "peft"
    assert run_cli("lora_exp.paper", "--check", "--out", str(out), cwd=tmp_path).returncode == 0
    (sweep / "1" / "metrics.json").write_text((sweep / "1" / "metrics.json").read_text().replace("0", "1", 1))
    proc = run_cli("lora_exp.paper", "--check", "--out", str(out), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and f"changed: {(sweep / '1' / 'metrics.json').resolve()}" in proc.stderr
