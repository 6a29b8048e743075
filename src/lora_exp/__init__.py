"""lora-exp: LoRA / QLoRA fine-tuning experiments for Llama models with Hydra, Lightning and PEFT."""

__version__ = "0.1.0"
