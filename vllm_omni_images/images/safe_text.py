"""What a client sent, as a short printable prefix safe to log or echo in a message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ECHO_CHARS = 40
"""How much of a value a message echoes."""


def printable(text: str, limit: int) -> str:
    """At most `limit` characters of `text`, each unprintable one as its escape (`\\n`)."""
    cut = text[:limit]
    safe = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in cut
    )
    return safe + "..." if len(text) > limit else safe


def echo(value: object) -> str:
    """A short stand-in for `value`: a string's prefix (and length), a container's size."""
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
