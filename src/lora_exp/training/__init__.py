"""One training run: the recipe (``run``), the LightningModule, loss, fast path, callbacks, loggers, resume."""
