"""A mistake in the user's input and how it is reported: `UserError`, printed by the CLI as one
line without a traceback, or with the original traceback under `--debug` (RFTENGINE_DEBUG=1)."""

from __future__ import annotations

import os
from contextlib import contextmanager


class UserError(Exception):
    """A mistake in the user's input (config, data, paths): reported without a traceback."""


def debugging() -> bool:
    """Whether the original traceback is wanted (`rftengine --debug`, or RFTENGINE_DEBUG=1)."""
    return bool(os.environ.get("RFTENGINE_DEBUG"))


@contextmanager
def debug_mode(on: bool):
    """RFTENGINE_DEBUG=1 for the duration of a `--debug` command (what `as_user_error` reads)."""
    if not on:
        yield
        return
    before = os.environ.get("RFTENGINE_DEBUG")
    os.environ["RFTENGINE_DEBUG"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RFTENGINE_DEBUG"]
        else:
            os.environ["RFTENGINE_DEBUG"] = before


@contextmanager
def as_user_error(where: str | None = None):
    """ValueError/OSError raised while reading the user's inputs -> UserError with the same
    message, after "`where`: " when given (the input it concerns).

    `--debug` or RFTENGINE_DEBUG=1 shows the original traceback instead."""
    try:
        yield
    except (ValueError, OSError) as exc:
        if debugging():
            raise
        raise UserError(f"{where}: {exc}" if where is not None else str(exc)) from None
