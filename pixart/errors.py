"""The one error type users see as a single line, not a traceback."""


class PixArtError(ValueError):
    """Bad input: a file, key or argument. The message names it."""
