"""lora-exp's Hydra sweeper plugin: per-configuration learning-rate tuning (``hydra/sweeper=tuned``)."""
