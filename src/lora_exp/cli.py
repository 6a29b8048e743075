"""The command runner: one way every command reports a user error, and the ``lora-exp`` console script.

A user error (``lora_exp.errors.UserError``: a bad config value, a missing file, a gated model) is
printed as one line, ``lora_exp.<command>: error: ...``, with exit status 2; ``HYDRA_FULL_ERROR=1``
shows the traceback instead. ``lora-exp <command> [args]`` is ``python -m lora_exp.<command> [args]``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# command -> (module, one-line description); the order is the order of a user's day
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lora_exp.train", "one fine-tuning run; -m for a sweep (Hydra key=value overrides)"),
    "plan": ("lora_exp.plan", "dry run: parameter counts, adapter size, memory; -m for each sweep point"),
    "preview": ("lora_exp.data.preview", "the training examples as the model sees them, supervised part marked"),
    "evaluate": ("lora_exp.evaluate", "metrics of trained adapters (and the base) on a split or a file"),
    "generate": ("lora_exp.generate", "text from base + adapter; interactive chat without prompt="),
    "export": ("lora_exp.export", "the adapter merged into its base as a plain HF model folder"),
    "report": ("lora_exp.report", "comparison tables, statistics and plots over sweeps' run directories"),
    "paper": ("lora_exp.paper", "tables, figures and cited numbers rebuilt from run directories, with --check"),
    "reproduce": ("lora_exp.reproduce", "re-run a finished run from its saved config and compare"),
}


def fail(command: str, error: BaseException | str) -> NoReturn:
    """Print one error line for ``command`` and exit with status 2."""
    print(f"lora_exp.{command}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def run(command: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a ``UserError`` becomes one line on stderr and exit status 2.

    ``HYDRA_FULL_ERROR=1`` lets the exception through, traceback and all.
    """
    from lora_exp.errors import UserError

    try:
        return fn(*args, **kwargs)
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(command, e)


def hydra_help(command: str, doc: str | None, argv: list[str]) -> list[str]:
    """With ``--help``, the overrides that make Hydra print ``command``'s own help rather than train's."""
    if "--help" not in argv and "-h" not in argv:
        return argv
    header = (doc or "").strip().replace("'", "\\'").replace("$", "\\$")
    return [*argv, f"hydra.help.app_name=lora_exp.{command}", f"hydra.help.header='{header}'", "hydra.help.footer=''"]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lora-exp <command> [args]   (or: python -m lora_exp.<command> [args])",
        "",
        "commands:",
        *(f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()),
        "",
        "`lora-exp <command> --help` shows a command's own options. Hydra commands take key=value overrides;",
        'shell completion (bash): eval "$(lora-exp train -sc install=bash)" (see the README).',
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``lora-exp <command> [args]``: run ``lora_exp.<command>`` as ``python -m`` would."""
    import runpy

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _COMPLETION_FLAGS:  # the shell asks what may follow (Hydra's completion script)
        return _complete(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lora-exp: error: no command {command!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[command][0]
    if any(a.split("=", 1)[0] in _COMPLETION_FLAGS for a in rest):
        # Hydra names the completed command after argv[0]: the script it prints then completes `lora-exp`
        sys.argv = ["lora-exp", *rest]
        runpy.run_module(module, run_name="__main__")
        return
    sys.argv = [f"lora-exp {command}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


_COMPLETION_FLAGS = ("-sc", "--shell-completion")
# the commands that are Hydra apps, so Hydra can complete their groups and keys
HYDRA_COMMANDS = ("train", "plan", "evaluate", "generate", "export")


def _complete(argv: list[str]) -> None:
    """Answer ``lora-exp -sc query=bash`` (``$COMP_LINE`` holds the line being typed).

    The command word is completed here; after it, the command's own Hydra app completes the rest,
    given the line without the command word (Hydra strips one app name from it).
    """
    import runpy

    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
        typed = words[1] if len(words) == 2 else ""
        print(" ".join(name for name in COMMANDS if name.startswith(typed)))
        return
    command = words[1]
    if command not in HYDRA_COMMANDS:
        return
    os.environ["COMP_LINE"] = line.replace(command, "", 1)
    sys.argv = ["lora-exp", *argv]
    runpy.run_module(COMMANDS[command][0], run_name="__main__")
