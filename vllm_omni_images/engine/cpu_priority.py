"""Bulk work (denoising, encoding) steps aside for the event loop that serves requests."""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

ENGINE_THREAD_NICENESS = 10


def yield_cpu_to_serving() -> None:
    """Run the calling thread, and the threads it starts, at a lower CPU priority (a bulk
    thread pool's `initializer`); left as it is where that fails."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENGINE_THREAD_NICENESS)
    except (AttributeError, OSError):  # not Linux-like, or not permitted: serve as is
        logger.debug("Could not lower the thread's priority", exc_info=True)
