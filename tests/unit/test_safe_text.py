"""What messages and logs echo of what a client sent: short, and printable."""

from __future__ import annotations

import pytest

from vllm_omni_images.images.safe_text import echo, printable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain id-42", "plain id-42"),
        ("a\nb\r\x1b[2Kc", "a\\nb\\r\\x1b[2Kc"),
        ("\u202eevil\u2028", "\\u202eevil\\u2028"),  # bidi override, line separator
        ("x" * 20, "x" * 8 + "..."),
    ],
)
def test_printable_escapes_control_characters_and_cuts(text: str, expected: str) -> None:
    assert printable(text, 8 if len(text) == 20 else 100) == expected


def test_echo_is_short_whatever_it_is_given() -> None:
    assert echo("banana") == "'banana'"
    long = echo("secret" * 10_000)
    assert long.endswith("(60000 characters)") and len(long) < 80
    assert echo(["x"] * 1000) == "<list of 1000 items>"
    assert echo({"a": 1}) == "<dict of 1 items>"
    assert echo(b"\x89PNG" * 1000) == "<4000 bytes>"
    assert echo(3.5) == "3.5"
    assert len(echo(10**3000)) < 50
