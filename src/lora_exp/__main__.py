"""``python -m lora_exp``: list the commands (``python -m lora_exp <command> ...`` runs one)."""

from lora_exp.cli import main

main()
