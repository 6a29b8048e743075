"""``python -m lora_exp.paper``: the tables, figures and numbers a manuscript cites, rebuilt from the runs.

    python -m lora_exp.paper SWEEP_DIR... --out DIR [--metric M] [--baseline KEY=VALUE...] [--overwrite]
    python -m lora_exp.paper --check --out DIR
    python -m lora_exp.paper [SWEEP_DIR...] --model-card RUN_DIR

The first writes DIR (tables/*.tex, figures/*.pdf|png, numbers.tex, README.md, manifest.json; see
``lora_exp.reporting.paper``). ``--check`` re-hashes every file the manifest names and exits 1
listing each changed or missing input (with its run), new run or edited output, 0 when all match.
``--model-card`` writes RUN_DIR/adapter/README.md, with CIs over its configuration's seeds when
the run is in the SWEEP_DIRs given; with ``--out`` as well, both are written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_exp import cli
from lora_exp import metrics as M


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_exp.paper",
        description="Tables (.tex), figures (PDF+PNG), numbers.tex and manifest.json rebuilt from sweeps' run "
        "directories; --check verifies them against the runs; --model-card writes an adapter's model card.",
    )
    p.add_argument("sweep_dirs", nargs="*", type=Path, help="sweep (multirun) directories, or run directories")
    p.add_argument("--out", type=Path, default=None, help="the paper folder (written, or checked with --check)")
    p.add_argument(
        "--check", action="store_true", help="verify --out's manifest.json against the files; exit 1 on change"
    )
    p.add_argument("--model-card", type=Path, default=None, metavar="RUN_DIR", help="write RUN_DIR/adapter/README.md")
    p.add_argument(
        "--metric", default=M.VAL_LOSS, help=f"metric of the figures and Best* numbers (default {M.VAL_LOSS})"
    )
    p.add_argument("--baseline", nargs="+", metavar="KEY=VALUE", default=None,
                   help="also compare every configuration with this one (e.g. --baseline lora.r=8)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise significance level (default 0.05)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous paper output at --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.check:
        return cli.run("paper", check, args)
    if args.out is None and args.model_card is None:
        cli.fail("paper", "--out DIR is required (or --check --out DIR, or --model-card RUN_DIR)")
    if args.out is not None and not args.sweep_dirs:
        cli.fail("paper", "--out needs at least one SWEEP_DIR to build from")
    if args.out is not None:
        from lora_exp.reporting.paper import build_paper
        from lora_exp.runs.provenance import command_line
        from lora_exp.runs.secrets import redact_argv

        command = redact_argv(command_line() if argv is None else ["python", "-m", "lora_exp.paper", *argv])
        cli.run("paper", build_paper, args.sweep_dirs, args.out, args.metric, args.alpha, args.baseline,
                args.overwrite, command)  # fmt: skip
    if args.model_card is not None:
        from lora_exp.reporting.modelcard import write_model_card

        cli.run("paper", write_model_card, args.model_card, args.sweep_dirs or None)
    return 0


def check(args) -> int:
    """``--check``: print each problem on its own line; the exit status says whether there was any."""
    from lora_exp.reporting.manifest import check as check_manifest

    if args.out is None:
        cli.fail("paper", "--check needs --out DIR (the paper folder holding manifest.json)")
    if args.sweep_dirs:
        cli.fail("paper", "--check reads the sweep directories from the manifest; give only --out DIR")
    result = check_manifest(args.out)
    for line in result.problems:
        print(f"lora_exp.paper --check: {line}", file=sys.stderr)
    if result.problems:
        n = len(result.problems)
        print(f"[lora-exp] paper --check: {n} problem{'s' * (n != 1)}: {args.out} is stale; rebuild it", flush=True)
        return 1
    print(
        f"[lora-exp] paper --check: {result.inputs} input files of {result.runs} runs and {result.outputs} outputs "
        f"match {args.out}/manifest.json",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
