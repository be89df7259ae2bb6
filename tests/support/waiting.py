"""Waiting, in tests, for state that changes without an event to await.

Some state changes on the engine thread, where no asyncio.Event can be set, and admission
exposes no event for the rest; `until` polls it instead, with a deadline, so a test that goes
wrong fails instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

WAIT_S = 2.0
"""The longest a test waits for something that should happen at once (the fake engines)."""

ENGINE_WAIT_S = 10.0
"""The longest a test waits for something the real tiny engine should do soon."""


async def until(
    condition: Callable[[], bool], what: str = "the condition", *, timeout_s: float = WAIT_S
) -> None:
    """Poll `condition` until it holds; fail the test, naming `what`, after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        await asyncio.sleep(0.001)
