"""``python -m lora_exp.train [overrides]``: one LoRA fine-tune; ``-m`` for a sweep.

Heavy libraries are imported only once a job starts, so ``--cfg job`` and ``--help`` are quick.
"""

import hydra
from omegaconf import DictConfig

from lora_exp.config import config_dir
from lora_exp.config.resolvers import register_resolvers

register_resolvers()  # ${sqlite_url:...} in sweeps/optuna.yaml


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lora_exp.training.run import run_cli

    return run_cli(cfg)


if __name__ == "__main__":
    import sys

    from lora_exp.config.validate import exit_on_bad_overrides

    exit_on_bad_overrides(sys.argv[1:])  # all unknown options and keys at once, exit status 2
    main()
