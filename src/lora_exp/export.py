"""``python -m lora_exp.export run_dir=DIR [out=DIR] [dtype=...]``: the adapter merged into its base.

The result is a plain HF model folder (weights, config, tokenizer) that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with no PEFT. The merge is done in
float32 by PEFT's ``merge_and_unload``; the command then reloads the saved folder and prints the
largest logit difference against base + unmerged adapter on held-out examples. A QLoRA run's
adapter is merged into the dequantized 4-bit base, and the drift from the quantized model it was
trained with is printed.
"""

import sys

import hydra
from omegaconf import DictConfig

from lora_exp import cli
from lora_exp.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    from lora_exp.inference.export import export

    cli.run("export", export, cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *cli.hydra_help("export", __doc__, sys.argv[1:])]
    main()
