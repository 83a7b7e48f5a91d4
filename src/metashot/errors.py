"""Errors a user can act on. The command line prints them as one line, ``metashot: error: ...``, and exits
with ``exit_code``; any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class MetashotError(Exception):
    """A problem with the user's input, files or run, not with metashot: one line names it and what
    was expected."""

    exit_code = 2


class ConfigError(MetashotError, ValueError):
    """A config value, option or ``--set`` that cannot be used."""


class RunFolderError(MetashotError):
    """A run folder that is missing, busy (another process holds it), unwritable or damaged."""


class CheckpointError(RunFolderError, ValueError):
    """A checkpoint that is missing, truncated or not a metashot checkpoint."""


class NonFiniteError(MetashotError, FloatingPointError):
    """Training diverged: the loss, a parameter or a buffer became NaN or infinite."""

    exit_code = 1


class DataError(MetashotError, ValueError):
    """A dataset file that is missing, corrupt, of the wrong layout, or not the dataset it claims."""
