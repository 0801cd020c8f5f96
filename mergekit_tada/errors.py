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


def same_for_every_tensor(values: list, message: str) -> object:
    """The one value that per-tensor resolution gave every tensor, else an error.

    Settings read once per merge (data, a training) must not vary per tensor
    (gradients, filters).
    """
    if any(v != values[0] for v in values):
        raise TadaError(message)
    return values[0]
