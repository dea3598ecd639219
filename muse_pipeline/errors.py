"""Errors a user can cause (bad flags, missing files, wrong data), as opposed to bugs.

Every such error derives from `UserError`. Its message is one line, "what happened; what to do".
The `muse` CLI prints it as `error: <message>` and exits non-zero without a traceback (unless
`muse --debug` or `MUSE_DEBUG=1`). Any other exception is a bug and keeps its traceback.

Library modules raise subclasses (AnnotationError, DecodeError, CacheError, ...) so that callers
can still catch the specific kind; the CLI only needs to know the base class.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; `str(exc)` is the one-line message shown after `error: `."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(UserError, ValueError):
    """A bad option value or a missing / unreadable input, detected before anything is written."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the command needs does not exist (a FileNotFoundError too, for old callers)."""

    def __str__(self) -> str:  # OSError would format (errno, strerror); the message is all we have
        return str(self.args[0])
