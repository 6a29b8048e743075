"""``python -m lora_exp.data.preview [overrides...] [-n N] [--split val] [--tokens]``: see what the model sees.

Renders N examples exactly as training will (same config overrides as ``lora_exp.train``: chat
template, masks, truncation) and prints them with the supervised text between ``[[`` and ``]]``
(green on a terminal). ``--tokens`` prints one token per line with its id and label instead.
What is printed is decoded from the very token ids training uses (the same tokenized-data cache),
so a JSON value in the data shows as the JSON text it is trained as (``lora_exp.data.formats``).
Loads the tokenizer only, never the model weights.
"""

from __future__ import annotations

import argparse
import sys

START, END = "[[", "]]"
GREEN, RESET = "\033[32m", "\033[0m"


def segments(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """Consecutive runs of supervised / unsupervised tokens, decoded (special tokens kept)."""
    runs: list[tuple[bool, list[int]]] = []
    for i, label in zip(ids, labels):
        sup = label != -100
        if runs and runs[-1][0] == sup:
            runs[-1][1].append(i)
        else:
            runs.append((sup, [i]))
    return [(sup, tokenizer.decode(toks, skip_special_tokens=False)) for sup, toks in runs]


def render(tokenizer, row: dict, color: bool = False) -> str:
    """One example as text with its supervised parts marked."""
    out = []
    for sup, text in segments(tokenizer, row["input_ids"], row["labels"]):
        out.append(f"{GREEN if color else ''}{START}{text}{END}{RESET if color else ''}" if sup else text)
    return "".join(out)


def render_tokens(tokenizer, row: dict) -> str:
    """One line per token: position, id, supervised flag, the token."""
    lines = []
    for j, (i, label) in enumerate(zip(row["input_ids"], row["labels"])):
        lines.append(f"{j:5d} {i:7d} {'S' if label != -100 else '.'} {tokenizer.convert_ids_to_tokens(i)!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_exp.data.preview",
        description="Print rendered training examples with the supervised part marked [[like this]].",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, as for lora_exp.train (data=jsonl ...)")
    parser.add_argument("-n", "--n", type=int, default=3, help="how many examples (default 3)")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--tokens", action="store_true", help="one token per line with its id and label")
    args = parser.parse_args(argv)
    try:
        print(preview(args.overrides, args.n, args.split, args.tokens, color=sys.stdout.isatty()))
    except Exception as e:
        from hydra.errors import HydraException

        from lora_exp.errors import UserError

        if not isinstance(e, (UserError, HydraException)):
            raise
        print(f"lora_exp.data.preview: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    return 0


def preview(overrides: list[str], n: int, split: str = "train", tokens: bool = False, color: bool = False) -> str:
    """The text ``main`` prints: a header per example, then the example."""
    from hydra import compose, initialize_config_dir

    from lora_exp.config import config_dir
    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.model.load import load_tokenizer, resolve_model_folder

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    tokenizer = load_tokenizer(resolve_model_folder(cfg.model))
    dm = InstructionDataModule(cfg.data, tokenizer, cfg.seed)
    dm.setup("fit")
    rows = dm.train_rows if split == "train" else dm.val_rows
    out = [
        f"format {dm.format}; {len(rows)} {split} examples; supervised text between {START} and {END}; "
        f"data/fingerprint {dm.fingerprint[:16]}"
    ]
    for k, row in enumerate(rows[:n]):
        n_sup = sum(1 for label in row["labels"] if label != -100)
        cut = f" (truncated to {cfg.data.max_seq_len})" if row.get("truncated") else ""
        size = f"{len(row['input_ids'])} tokens{cut}, {n_sup} supervised"
        out.append(f"\n===== {split} example {k + 1} of {len(rows)}: {size}")
        out.append(render_tokens(tokenizer, row) if tokens else render(tokenizer, row, color))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
