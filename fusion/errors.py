"""The project's own error types.

Every problem a user can cause (bad config, missing checkpoint, bad data) is raised as a
:class:`UnifuseError` subclass whose message names the file, line or key. Command-line
tools catch these and print one line instead of a library traceback.
"""

from __future__ import annotations


class UnifuseError(Exception):
    """Base class of every error a user can fix."""


class ConfigError(UnifuseError):
    """A config value is invalid; the message names the key."""


class CheckpointError(UnifuseError):
    """A checkpoint folder is missing, incomplete or not of the expected kind."""


class DataError(UnifuseError):
    """A data sample is invalid. Carries the file and 1-based line it came from."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, kind: str = "invalid"):
        self.path = path
        self.line = line
        self.kind = kind
        self.reason = message
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")


class NumericalError(UnifuseError):
    """A loss or gradient went NaN / Inf and the run's policy says stop."""
