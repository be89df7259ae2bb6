"""`HangWatch`: work asked to stop that still runs `grace_s` later marks the engine hung until
every such work has returned. Used on one event loop, by both engines."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable

from vllm_omni_images.engine.base import EngineObserver, NoObserver, notify
from vllm_omni_images.engine.errors import EngineHungError

logger = logging.getLogger(__name__)


class HangWatch:
    def __init__(
        self,
        grace_s: float | None,
        on_hung: Callable[[EngineHungError], None],
        *,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`grace_s`: how long stopping may take (`None`: never hung); `on_hung` gets the error
        when the engine is taken as hung."""
        self.grace_s = grace_s
        self._on_hung = on_hung
        self._observer = observer or NoObserver()
        self._clock = clock
        self._late: set[Hashable] = set()
        self._hung_since: float | None = None
        self.hung = asyncio.Event()
        """Set while the engine is taken as hung."""

    def error(self) -> EngineHungError | None:
        """What requests get while the engine is taken as hung; `None` while it is not."""
        if self._hung_since is None or self.grace_s is None:
            return None
        return EngineHungError(self.grace_s)

    def stopping(self, work: Hashable, running: Callable[[], bool], what: str) -> None:
        """`work` was asked to stop: late if `running()` still holds `grace_s` from now."""
        if self.grace_s is not None:
            asyncio.get_running_loop().call_later(self.grace_s, self._check, work, running, what)

    def returned(self, work: Hashable) -> None:
        """`work` returned; the engine serves again once no late work is left."""
        self._late.discard(work)
        if self._late or self._hung_since is None:
            return
        logger.warning(
            "The image engine returned from its hung work after %.1f s more; it serves again "
            "(/health answers 200).",
            self._clock() - self._hung_since,
        )
        self._hung_since = None
        self.hung.clear()
        notify(self._observer.on_engine_hung, False)

    def _check(self, work: Hashable, running: Callable[[], bool], what: str) -> None:
        if not running():
            return
        self._late.add(work)
        if self._hung_since is not None:
            return
        self._hung_since = self._clock()
        self.hung.set()
        error = self.error()
        assert error is not None
        logger.error(
            "The image engine has not returned from %s %g s after every request in it timed "
            "out or went away: it is taken as hung. /health answers 503, and requests fail "
            "with 503 until it returns.",
            what,
            error.grace_s,
        )
        self._on_hung(error)
        notify(self._observer.on_engine_hung, True)
