"""``python -m lora_exp.report SWEEP_DIR... [--metric M] [--baseline KEY=VALUE...] [--out DIR] [--offline]``.

A comparison report over a sweep's run directories: per-configuration statistics over seeds,
every configuration tested against the best one (and a named baseline) with seed-paired or
Welch's t-tests, Holm-corrected; tables (CSV, LaTeX, Markdown, HTML) with the significance marks,
plots, and a W&B summary run of the tables. See ``lora_exp.reporting.report`` for the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_exp import cli
from lora_exp import metrics as M


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_exp.report",
        description="Comparison report (tables, LaTeX, plots) over the run directories of one or more sweeps.",
    )
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep (multirun) directories, or run directories")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: FIRST_SWEEP_DIR/report)")
    parser.add_argument("--metric", default=M.VAL_LOSS, help=f"metric of plots and 'best' (default {M.VAL_LOSS})")
    parser.add_argument("--offline", action="store_true", help="never contact W&B, even when logged in")
    parser.add_argument("--entity", default=None, help="W&B entity for the online report (default: yours)")
    parser.add_argument(
        "--baseline",
        nargs="+",
        metavar="KEY=VALUE",
        default=None,
        help="also compare every configuration with this one (e.g. --baseline lora.r=8 lora.target_modules=qv)",
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise significance level (default 0.05)")
    args = parser.parse_args(argv)
    from lora_exp.reporting.report import build_report

    cli.run(
        "report",
        build_report,
        args.sweep_dirs,
        args.out,
        args.metric,
        online=not args.offline,
        entity=args.entity,
        baseline=args.baseline,
        alpha=args.alpha,
    )


if __name__ == "__main__":
    main()
