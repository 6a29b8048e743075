"""``python -m lora_exp.generate run_dir=DIR prompt="..."``: text from the base model + a trained adapter.

The prompt goes through the tokenizer's chat template (as in training), tokens are streamed to
stdout as they are generated, and without ``prompt=`` the command is a chat in the terminal that
keeps the conversation. Status lines go to stderr, so stdout holds only the model's text.
"""

import sys

import hydra
from omegaconf import DictConfig

from lora_exp import cli
from lora_exp.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate")
def main(cfg: DictConfig) -> None:
    from lora_exp.inference.generate import generate

    cli.run("generate", generate, cfg)


if __name__ == "__main__":
    from lora_exp.inference.generate import FREE_TEXT_KEYS
    from lora_exp.inference.session import quote_free_text

    sys.argv = [sys.argv[0], *cli.hydra_help("generate", __doc__, quote_free_text(sys.argv[1:], FREE_TEXT_KEYS))]
    main()
