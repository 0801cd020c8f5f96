"""The one exception type users see from bad input."""

import click


class TadaError(click.ClickException, ValueError):
    """Bad input or configuration; the message names the file, module or key.

    A ``click.ClickException``, so that every command line that reaches our
    code (the stock ``mergekit-yaml`` and ``mergekit-multi`` too) prints it as
    one ``Error: ...`` line with exit code 1 instead of a traceback, while
    unexpected exceptions keep theirs. A ``ValueError`` for Python callers.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return self.message
