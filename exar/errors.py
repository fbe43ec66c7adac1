"""The one exception type users see: a single readable line, no traceback unless --debug."""


class ExarError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints ``error: <message>`` and exits with ``exit_code``; library callers catch it
    like any exception. Name the file, field or line in the message.
    """

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadRecord(ExarError):
    """One record of the user's data file is unusable (the message names the file and line or item)."""
