"""The one exception type users see from bad input."""


class TadaError(ValueError):
    """Bad input or configuration; the message names the file, module or key."""
