"""The ``data.*`` keys every data set reads, declared for ``lora_exp.config.validate``.

Keys of one data source (``data.format``, ``data.fields``, hub names) are checked where the
records are loaded, with the file and line at hand.
"""

from __future__ import annotations

from lora_exp.config.schema import Check, run_checks

CHECKS = (
    Check("data.max_seq_len", "int", low=1),
    Check("data.batch_size", "int", low=1),
    Check("data.eval_batch_size", "int", low=1, optional=True),
    Check("data.train_path", "file", optional=True),
    Check("data.val_path", "file", optional=True),
    # the tokenized-data cache (lora_exp.data.tokenized); absent in configs saved before it existed
    Check("data.cache", "bool", optional=True),
)


def check(cfg, problems: list[str]) -> None:
    """Append every problem with the declared ``data`` keys to ``problems``."""
    run_checks(cfg, CHECKS, problems)
