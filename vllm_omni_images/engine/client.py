"""`ImageEngineClient`: the one seam between the HTTP layers and an image engine.

vLLM's server keeps it as `app.state.engine_client` (as it keeps `AsyncLLM` for a text
model): its core routes and server loop ask it for `check_health()`, `errored`, `is_running`,
`do_log_stats()` and `shutdown()`. The Images API asks it for the model's defaults, for
images, which it gets through the scheduler (admission, batching, timeouts), never on the
event loop, and records each request's outcome through it. Nothing above it touches the
scheduler, the engine or the metrics directly.

Importable without vLLM: vLLM's own exception is imported only to report a dead engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from vllm_omni_images.engine.base import AnyImageEngine, EngineRequest, ModelDefaults
from vllm_omni_images.engine.errors import (
    EngineDiedError,
    EngineHungError,
    EngineNotReadyError,
    SchedulerClosedError,
)
from vllm_omni_images.engine.scheduler import ImageScheduler, RequestTimings, SchedulerConfig

if TYPE_CHECKING:
    from vllm_omni_images.engine.metrics import ModelMetrics, Outcome


@dataclass(frozen=True)
class ShutdownConfig:
    """The one field of `VllmConfig` that vLLM's `serve_http` reads from an engine client."""

    shutdown_timeout: int = 0


class ImageEngineClient:
    def __init__(
        self,
        engine: AnyImageEngine | None,
        model_name: str,
        scheduler_config: SchedulerConfig | None = None,
        *,
        metrics: ModelMetrics | None = None,
        shutdown_timeout: int = 0,
    ) -> None:
        self.model_name = model_name
        self.vllm_config = ShutdownConfig(shutdown_timeout)
        self._engine = engine
        self.scheduler: ImageScheduler | None = None
        if engine is not None:
            self.scheduler = ImageScheduler(
                engine, scheduler_config or SchedulerConfig(), observer=metrics
            )
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed = threading.Event()

    @property
    def engine(self) -> AnyImageEngine:
        if self._engine is None or self._closed.is_set():
            raise EngineNotReadyError(f"The model `{self.model_name}` is not loaded.")
        return self._engine

    @property
    def is_ready(self) -> bool:
        return self._engine is not None and not self._closed.is_set()

    @property
    def defaults(self) -> ModelDefaults:
        return self.engine.defaults

    # vLLM's server loop shuts the server down when `errored and not is_running`; an image
    # engine error fails one request, never the server, and a hung engine may yet recover.
    @property
    def errored(self) -> bool:
        return False

    @property
    def is_running(self) -> bool:
        return self.is_ready

    async def check_health(self) -> None:
        """Raise vLLM's `EngineDeadError` (which `/health` answers with 503) when no model is
        loaded, the engine died, or it is taken as hung (until its call returns)."""
        try:
            self.engine.check_health()  # raises EngineNotReadyError without a model
            if self.scheduler is not None and (hung := self.scheduler.hung_error()) is not None:
                raise hung
        except (EngineNotReadyError, EngineDiedError, EngineHungError) as error:
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError(str(error)) from error

    async def do_log_stats(self) -> None:
        return None

    async def generate(
        self, request: EngineRequest, timings: RequestTimings | None = None
    ) -> list[Image.Image]:
        """Queue `request` with the scheduler and wait for its images. Raises
        `EngineNotReadyError` without a model, `SchedulerClosedError` while shutting down, and
        whatever `ImageScheduler.submit` raises."""
        self.engine  # noqa: B018 - raises EngineNotReadyError when there is no model
        assert self.scheduler is not None
        if self._closing:  # draining: finish what was accepted, take nothing new
            raise SchedulerClosedError()
        self._loop = asyncio.get_running_loop()
        return await self.scheduler.submit(request, timings)

    def record_request(
        self, outcome: Outcome, images: int = 0, encode_s: float | None = None
    ) -> None:
        """Count one answered API request (called once per request, whatever its outcome)."""
        if self._metrics is not None:
            self._metrics.record_request(outcome, images, encode_s)

    async def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking work and free the model. Waiting requests get a shutdown error after
        at most `drain_timeout_s` of draining; a running batch finishes first."""
        if self._closing:
            return
        self._closing = True
        if self.scheduler is not None:
            deadline = time.monotonic() + drain_timeout_s
            # A once-per-process wait: polling keeps the scheduler free of an idle event.
            while self._busy() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await self.scheduler.close()
        self._release_engine()

    def _release_engine(self) -> None:
        self._closed.set()
        if self._engine is not None:
            self._engine.close()

    def _busy(self) -> bool:
        scheduler = self.scheduler
        return scheduler is not None and scheduler.queued_images + scheduler.running_images > 0

    def shutdown(self, timeout: float | None = None) -> None:
        """vLLM's synchronous shutdown hook, called from a worker thread on SIGTERM/SIGINT:
        runs `close` on the event loop that serves the requests."""
        if self._closed.is_set():
            return
        loop = self._loop
        if loop is not None and loop.is_running() and not _on_loop_thread(loop):
            asyncio.run_coroutine_threadsafe(self.close(timeout or 0.0), loop).result()
            return
        # No request ever ran (so no worker to stop), or we are past the loop.
        self._release_engine()


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
