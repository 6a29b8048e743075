"""Deterministic benchmark data: instruction examples whose token lengths follow real instruction sets.

Every example is a chat (``user`` prompt, ``assistant`` reply) written as JSONL in the common
``{"messages": [...]}`` layout, so every contender reads the very same file. Text is built from
words that are exactly one token each (with their leading space) under the default model's
tokenizer, which makes each example's rendered length exact: the variable-length set follows a
log-normal spread clipped to 30..400 tokens (median ~140, as in Alpaca-style sets), the
fixed-length set has every example at the same length (no padding at all: overhead alone).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

WORDS = """the of and to in is for on with as by at from that this it be are was or an which can
not have has all one more new about out up time other use two will into make only over such
first any some may these then way well also people many most work well just like long part
little world very still own see men made since after year back great could where much through
good even under most now state small large high between each before old point right number
three show need give house order name place line turn help move form water hand find study
learn write read plan list data model value table report step word code test note key city
build check start run keep make take call test sort count share group change answer question
simple clear short brief detail example result reason idea power light sound color music story
food market price money plant animal tree river road school class team game player health body
mind heart energy future past history science nature travel friend family child student teacher
""".split()

MIN_LEN, MAX_LEN = 30, 400
_OPENERS = ["Explain", "Describe", "Summarize", "List", "Write", "Compare", "Rewrite", "Classify"]


def single_token_words(tokenizer) -> list[str]:
    """The words that are exactly one token with a leading space (deduplicated, in a fixed order)."""
    seen, out = set(), []
    for w in WORDS:
        if w not in seen and len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1:
            seen.add(w)
            out.append(w)
    return out


def _text(rng: random.Random, words: list[str], n: int, opener: str | None = None) -> str:
    body = [rng.choice(words) for _ in range(max(n, 1))]
    if opener:
        body[0] = opener
    return " ".join(body)


def rendered_length(tokenizer, example: dict) -> int:
    """Tokens of the example rendered with the tokenizer's chat template (what every contender trains on)."""
    text = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_example(tokenizer, rng: random.Random, words: list[str], total: int, prompt_share: float) -> dict:
    """One chat example whose rendering is ``total`` tokens long (exact, up to template overhead)."""
    probe = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]}
    overhead = rendered_length(tokenizer, probe) - 2  # template tokens around the two one-token contents
    content = max(total - overhead, 2)
    n_prompt = max(1, round(content * prompt_share))
    n_reply = max(1, content - n_prompt)
    prompt = _text(rng, words, n_prompt, rng.choice(_OPENERS))
    reply = [rng.choice(words) for _ in range(n_reply)]

    def build() -> dict:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": " ".join(reply)}]}

    # each reply word is exactly one token, so the length is corrected word by word
    diff = total - rendered_length(tokenizer, build())
    if diff > 0:
        reply.extend(rng.choice(words) for _ in range(diff))
    elif diff < 0:
        del reply[max(len(reply) + diff, 1) :]
    return build()


def variable_lengths(n: int, seed: int) -> list[int]:
    """Log-normal lengths (median 140 tokens, long right tail) clipped to 30..400."""
    rng = random.Random(f"lengths:{seed}")
    return [min(MAX_LEN, max(MIN_LEN, round(math.exp(rng.gauss(math.log(140), 0.6))))) for _ in range(n)]


def generate(tokenizer, n: int, seed: int, fixed_length: int | None = None) -> list[dict]:
    """``n`` examples; lengths spread like instruction sets, or all ``fixed_length`` tokens."""
    words = single_token_words(tokenizer)
    rng = random.Random(f"examples:{seed}:{fixed_length}")
    lengths = [fixed_length] * n if fixed_length else variable_lengths(n, seed)
    return [make_example(tokenizer, rng, words, total, rng.uniform(0.3, 0.7)) for total in lengths]


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
