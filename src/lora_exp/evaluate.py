"""``python -m lora_exp.evaluate run_dir=DIR [split=val] [data overrides]``: metrics of trained adapters.

Held-out loss, perplexity, token accuracy and exact match of the base model and of each adapter,
measured by the same ``LoraModule`` validation loop, precision and batches as training, so the
run's own validation split reproduces its recorded ``val/loss``. Several run directories
(``run_dir=[A,B,C]``) are loaded as named PEFT adapters onto one base and evaluated side by side.
"""

import sys

import hydra
from omegaconf import DictConfig

from lora_exp import cli
from lora_exp.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from lora_exp.inference.evaluate import evaluate

    cli.run("evaluate", evaluate, cfg)


if __name__ == "__main__":
    from lora_exp.inference.evaluate import with_run_data_choice

    sys.argv = [sys.argv[0], *cli.hydra_help("evaluate", __doc__, with_run_data_choice(sys.argv[1:]))]
    main()
