"""Errors a user can fix. Command-line entry points print them as one line (``error: ...``) and exit 2."""

from __future__ import annotations


class DynsilaError(Exception):
    """Bad input: the message names the problem and the fix."""


class ConfigError(DynsilaError):
    pass


class DataError(DynsilaError):
    pass


class CheckpointError(DynsilaError):
    pass


class TrainingError(DynsilaError):
    pass
