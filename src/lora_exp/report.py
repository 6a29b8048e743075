"""``python -m lora_exp.report SWEEP_DIR...``: a comparison report over a sweep's run directories.

Writes ``<first SWEEP_DIR>/report/`` (or ``--out``):

- ``results.csv``: one row per configuration, seeds aggregated: for every metric its number of
  runs, mean, sample std and 95% t-interval (columns ``<metric>:<stat>``), and the run
  directories each row was computed from;
- ``runs.csv``: one row per run directory (failed ones too) with its status and raw metrics;
- ``results.tex`` (booktabs, mean ± std, the best value of each column bold), ``report.md`` and a
  self-contained ``report.html`` (plots embedded);
- PNG plots: held-out metric vs rank per target set, a rank x alpha heatmap, loss curves per
  configuration, metric vs trainable parameters.

Everything comes from local files (``metrics.json``, ``.hydra/``, ``history.jsonl`` or the CSV
logger's ``metrics.csv``), so the report works offline and every number traces back to a run
directory. When logged in to W&B it also lists W&B runs of the sweep's group that are not on this
machine and creates a W&B Report for the group (``wandb-workspaces``); neither is needed offline.
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
    args = parser.parse_args(argv)
    from lora_exp.reporting.report import build_report

    cli.run("report", build_report, args.sweep_dirs, args.out, args.metric, online=not args.offline, entity=args.entity)


if __name__ == "__main__":
    main()
