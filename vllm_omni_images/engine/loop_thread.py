"""`LoopThread`: an event loop on a thread of its own, which coroutines from any loop run on."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> asyncio.Future[_T]:
        """Run `coroutine` on this loop; its result as a future of the caller's running loop
        (cancelling that future cancels the coroutine)."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Call `callback(*args)` on this loop, from any thread; nothing once it is stopped."""
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(callback, *args)

    def stop(self, last: Callable[[], None], timeout_s: float = 10.0) -> None:
        """Blocking: call `last` on this loop, then cancel every task left on it (waiting up to
        `timeout_s` for them) and stop it."""

        async def run_last() -> None:
            last()

        async def cancel_the_rest() -> None:
            current = asyncio.current_task()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(run_last(), self._loop).result()
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result(timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=timeout_s)
