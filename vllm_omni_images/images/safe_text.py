"""What a client sent, made safe to log or echo in a message.

A value comes back only as a short, printable prefix: a 10 MB data: URL or a 32000-character
prompt is not echoed, and no control character (a newline, an ANSI escape) reaches a log line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ECHO_CHARS = 40
"""How much of a value a message echoes."""


def printable(text: str, limit: int) -> str:
    """`text` safe to log or echo: at most `limit` characters, each one that is not printable
    (newlines, ANSI escapes, bidi controls) written as its escape (`\\n`, `\\x1b`)."""
    cut = text[:limit]
    safe = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in cut
    )
    return safe + "..." if len(text) > limit else safe


def echo(value: object) -> str:
    """A short stand-in for a value a client sent: a prefix of a string (and its length when
    cut), the size of a container, a number as written."""
    if isinstance(value, str):
        if len(value) <= ECHO_CHARS:
            return f"'{printable(value, ECHO_CHARS)}'"
        return f"'{printable(value, ECHO_CHARS)}' ({len(value)} characters)"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (Mapping, Sequence, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        return printable(str(value), ECHO_CHARS)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__}>"
