"""The one error type users see as a single line, not a traceback."""


class PixArtError(ValueError):
    """Bad input: a file, key or argument. The message names it."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An error's first line (its type's name when it has none), for a one-line message that quotes it."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
