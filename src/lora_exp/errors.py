"""Errors a user can fix: printed as one clear message with exit code 2, never a traceback."""


class UserError(Exception):
    """Base class for problems in the user's config, data, paths or environment."""


class ConfigError(UserError):
    """One or more config values are invalid; every problem is listed at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class ModelAccessError(UserError):
    """The configured model cannot be loaded here (missing package, gated hub model, offline)."""


class DataError(UserError):
    """The data set cannot be read or rendered."""


class ReportError(UserError):
    """A report or paper cannot be built from the given directories or options."""


class RunDirError(UserError):
    """A run directory is missing, unfinished, or does not fit the command (evaluate, generate, export)."""
