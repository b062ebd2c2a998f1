"""One small exception hierarchy; the CLI maps it to exit codes in one place.

    raise InputError("model.safetensors: tensor 'w': shape [2, 3] needs 24 bytes, has 20")   # exit 3
"""

from __future__ import annotations


class WtoolError(Exception):
    """Base of every error wtool raises on purpose; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(WtoolError):
    """Bad options: unknown transform or parameter, ill-typed value, existing output (exit 2)."""

    exit_code = 2


class InputError(WtoolError):
    """An input checkpoint (or recipe) is unreadable or invalid (exit 3)."""

    exit_code = 3


class OutputError(WtoolError):
    """The output could not be written: disk full, permission denied (exit 4)."""

    exit_code = 4
