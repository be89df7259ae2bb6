"""Bulk work (denoising, encoding) steps aside for the event loop that serves requests."""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

ENGINE_THREAD_NICENESS = 10


def yield_cpu_to_serving() -> None:
    """Run the calling thread, and the compute threads it starts, at a lower CPU priority.

    Denoising (and encoding) keep every core busy; the event loop (health checks, new
    requests, responses) needs a core for a moment now and then. On Linux niceness is per
    thread and inherited by the threads a thread creates, so torch's intra-op pool, started
    from the engine thread, steps aside too. The engine loses only what serving uses.
    Use it as the `initializer` of a thread pool that runs bulk work.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENGINE_THREAD_NICENESS)
    except (AttributeError, OSError):  # not Linux-like, or not permitted: serve as is
        logger.debug("Could not lower the thread's priority", exc_info=True)
