"""The kill watcher: marks a run ``interrupted`` when its process dies without recording an end.

``kill -9`` and the out-of-memory killer give a process no chance to write its status; a small
separate process does it for them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lora_exp.runs.rundir import METRICS_FILE

# A watcher process: when the training process dies without recording an end (kill -9, OOM kill),
# it rewrites a `running` metrics.json as `interrupted`. It learns of the death from EOF on its stdin,
# the read end of a pipe only the training process holds; no polling.
_WATCHER = r"""
import json, os, sys
sys.stdin.buffer.read()
path, pid = sys.argv[1], int(sys.argv[2])
try:
    data = json.load(open(path))
except Exception:
    sys.exit(0)
if data.get("status") == "running" and data.get("pid") == pid:
    data["status"] = "interrupted"
    data.pop("pid", None)
    tmp = path + ".watch.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
"""


def watch_for_kill(run_dir: Path) -> subprocess.Popen | None:
    """Start the watcher that marks this run ``interrupted`` if the process is killed outright.

    Keep the returned process referenced for the life of the run; its stdin pipe is the signal.
    """
    try:
        return subprocess.Popen(
            [sys.executable, "-S", "-c", _WATCHER, str(Path(run_dir) / METRICS_FILE), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal must not kill the watcher first
        )
    except OSError:
        return None
