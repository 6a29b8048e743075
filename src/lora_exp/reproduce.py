"""``python -m lora_exp.reproduce RUN_DIR``: re-run a finished run from its saved config and compare.

The run is repeated from the composed config it started with (``run.json``, else
``RUN_DIR/.hydra/config.yaml``; later changes to ``conf/`` do not matter) into a new directory,
``RUN_DIR.reproduce-<time>`` unless ``--out`` says otherwise. Then every recorded metric is
compared, and the adapter weights.

Exit status: 0 when everything matches (exactly on CPU; within ``--rtol``, default 1e-3, when the
run used a GPU, whose kernels are not bitwise deterministic), 1 when something differs, 2 when
``RUN_DIR`` cannot be reproduced (not a finished run). Differences between the recorded
environment (``run.json``: packages, hardware, git commit) and this one are printed as warnings:
they are the usual reason for a mismatch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_exp import cli
from lora_exp.runs.reproduce import GPU_RTOL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_exp.reproduce",
        description="Re-run a finished run from its saved config into a new directory and compare metrics and adapter.",
    )
    parser.add_argument("run_dir", type=Path, help="a completed lora_exp.train run directory")
    parser.add_argument("--out", type=Path, default=None, help="where to re-run (default: RUN_DIR.reproduce-<time>)")
    parser.add_argument(
        "--rtol", type=float, default=None, help=f"relative tolerance (default: 0 on CPU, {GPU_RTOL:g} for GPU runs)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra key=value overrides for the re-run (e.g. trainer.enable_progress_bar=false)"
    )
    args = parser.parse_args(argv)
    from lora_exp.runs.reproduce import reproduce

    return cli.run("reproduce", reproduce, args.run_dir, args.out, args.rtol, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
