"""Data: built-in tasks, chat templating with loss masks, and the Lightning DataModule."""
