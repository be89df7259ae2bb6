"""`ImageEngineClient`: admission in front of any `ImageEngine` (queue limit, timeout,
withdrawal, the counts), and the engine client vLLM's server keeps. Importable without vLLM."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm_omni_images.engine.base import (
    EngineObserver,
    EngineOutput,
    EngineRequest,
    FinalImages,
    ImageEngine,
    ImagesStarted,
    LoRAAdapter,
    ModelDefaults,
    NoObserver,
    notify,
)
from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineError,
    EngineHungError,
    EngineNotReadyError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
)
from vllm_omni_images.engine.memory_budget import check_within_budget


class AdapterRequest(Protocol):
    """What `add_lora` reads of vLLM's `LoRARequest`."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass(frozen=True)
class AdmissionConfig:
    """How much waiting work is accepted, and for how long (the `--image-*` flags)."""

    max_queue_images: int
    """Admitted images that have not started, beyond which new requests are refused."""
    request_timeout_s: float | None
    """Limit on queue wait plus run time; `None` for none."""

    def __post_init__(self) -> None:
        if self.max_queue_images < 1:
            raise ValueError(f"max_queue_images must be >= 1, got {self.max_queue_images}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


@dataclass(frozen=True)
class ShutdownConfig:
    """The one field of `VllmConfig` that vLLM's `serve_http` reads from an engine client."""

    shutdown_timeout: int = 0


@dataclass
class RequestTimings:
    """Where one request's time went; filled in as it goes."""

    queue_s: float = 0.0
    """From admission until its first image started (or it left)."""
    engine_s: float = 0.0
    """From its first image's start until it was answered."""
    batch_images: int = 0
    """Images running together with its first, its own included."""


@dataclass(eq=False)
class _Admitted:
    request: EngineRequest
    arrival: float
    timings: RequestTimings = field(default_factory=RequestTimings)
    waiting: int = 0
    started: int = 0
    started_at: float | None = None


class ImageEngineClient:
    """The engine client vLLM's server keeps as `app.state.engine_client`, over one engine."""

    # A text model's parts, which vLLM's serving-models object reads when it is built.
    model_config: Any = None
    renderer: Any = None
    input_processor: Any = None

    def __init__(
        self,
        engine: ImageEngine,
        model_name: str,
        config: AdmissionConfig,
        *,
        observer: EngineObserver | None = None,
        shutdown_timeout: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_name = model_name
        self.vllm_config = ShutdownConfig(shutdown_timeout)
        self._engine = engine
        self._config = config
        self._observer = observer or NoObserver()
        self._clock = clock
        self._queued_images = 0
        self._running_images = 0
        self._waiting_requests = 0
        self._running_requests = 0
        self._seconds_per_image: float | None = None
        self._loop = _running_loop()
        self._closing = False
        self._close_started = False
        self._closed = threading.Event()

    @property
    def engine(self) -> ImageEngine:
        if self._closed.is_set():
            raise EngineNotReadyError(f"The model `{self.model_name}` is not loaded.")
        return self._engine

    @property
    def defaults(self) -> ModelDefaults:
        return self.engine.defaults

    @property
    def queued_images(self) -> int:
        """Admitted images that have not started."""
        return self._queued_images

    @property
    def running_images(self) -> int:
        """Started images of requests not answered yet."""
        return self._running_images

    @property
    def waiting_requests(self) -> int:
        """Admitted requests none of whose images started."""
        return self._waiting_requests

    @property
    def running_requests(self) -> int:
        """Admitted requests some of whose images started, not answered yet."""
        return self._running_requests

    # vLLM's server loop shuts the server down when `errored and not is_running`; an image
    # engine error fails one request, never the server, and a hung engine may yet recover.
    @property
    def errored(self) -> bool:
        return False

    @property
    def is_running(self) -> bool:
        return not self._closed.is_set()

    async def check_health(self) -> None:
        """Raise vLLM's `EngineDeadError` (`/health` 503) when the model is released, or the
        engine died or is hung."""
        try:
            self.engine.check_health()
        except (EngineNotReadyError, EngineDiedError, EngineHungError) as error:
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError(str(error)) from error

    async def do_log_stats(self) -> None:
        return None

    async def add_lora(self, lora_request: AdapterRequest) -> bool:
        """Load a `LoRARequest`'s adapter into the engine; raise `LoRAAdapterError` if it can't."""
        await self.engine.add_lora(
            LoRAAdapter(
                name=lora_request.lora_name,
                adapter_id=lora_request.lora_int_id,
                path=lora_request.lora_path,
            )
        )
        return True

    def check_admission(self, request: EngineRequest) -> None:
        """Raise `EngineClosedError`, the engine's refusal, `RequestOverBudgetError` (its images
        alone exceed the engine's pixel budget), `RequestTooLargeError` or `QueueFullError` if
        `request` cannot be taken now."""
        self._admit(request, ask_engine=True)

    def _admit(self, request: EngineRequest, *, ask_engine: bool) -> None:
        engine = self.engine  # EngineNotReadyError once the model is released
        if self._closing:  # draining: finish what was admitted, take nothing new
            raise EngineClosedError()
        num_images = request.num_images
        if ask_engine:
            engine.check_admission(num_images)
        check_within_budget(request, engine.max_pixels_in_flight, engine.defaults.size_multiple)
        limit = self._config.max_queue_images
        if num_images > limit:
            raise RequestTooLargeError(num_images, limit)
        if self._queued_images + num_images > limit:
            excess = self._queued_images + num_images - limit
            raise QueueFullError(max(1.0, round(excess * (self._seconds_per_image or 1.0), 1)))

    async def generate(
        self,
        request: EngineRequest,
        timings: RequestTimings | None = None,
        *,
        checked: bool = False,
    ) -> AsyncGenerator[EngineOutput, None]:
        """The engine's outputs for `request`, admitted first (`checked`: the caller just asked
        `check_admission`, so the engine is not asked again); raises `RequestTimeoutError` past
        the timeout. `timings`, if given, is filled in as it goes."""
        self._admit(request, ask_engine=not checked)
        self._loop = asyncio.get_running_loop()  # where `shutdown` runs `close`
        admitted = _Admitted(request, self._clock(), timings or RequestTimings())
        self._count(admitted, queued=request.num_images)
        self._count_requests(waiting=1)
        timeout_s = self._config.request_timeout_s
        deadline = None if timeout_s is None else self._loop.time() + timeout_s
        stream = self._engine.generate(request)
        try:
            while True:
                # The deadline covers the engine's work only, never the caller's between
                # outputs (a timeout around a `yield` would cancel the caller's own awaits).
                try:
                    async with asyncio.timeout_at(deadline) as limit:
                        output = await anext(stream)
                except StopAsyncIteration:
                    raise EngineError("The engine ended the request without its images.") from None
                except TimeoutError:
                    if not limit.expired():
                        raise  # the engine's own TimeoutError
                    raise RequestTimeoutError(timeout_s or 0.0) from None
                if isinstance(output, ImagesStarted):
                    self._started(admitted, output)
                elif isinstance(output, FinalImages):
                    self._answered(admitted)
                yield output
                if isinstance(output, FinalImages):
                    return
        finally:
            await stream.aclose()  # withdraws the request unless it was answered
            self._leave(admitted)

    def _count(self, admitted: _Admitted, *, queued: int = 0, running: int = 0) -> None:
        """Add `queued` images to those not started and `running` to those started (or remove)."""
        admitted.waiting += queued
        admitted.started += running
        if queued:
            self._queued_images += queued
            notify(self._observer.on_queue_depth, self._queued_images)
        if running:
            self._running_images += running
            notify(self._observer.on_running_images, self._running_images)

    def _count_requests(self, *, waiting: int = 0, running: int = 0) -> None:
        self._waiting_requests += waiting
        self._running_requests += running
        notify(self._observer.on_requests, self._waiting_requests, self._running_requests)

    def _started(self, admitted: _Admitted, output: ImagesStarted) -> None:
        if admitted.started_at is None:
            admitted.started_at = self._clock()
            admitted.timings.queue_s = admitted.started_at - admitted.arrival
            admitted.timings.batch_images = output.batch_images
            notify(self._observer.on_queue_wait, admitted.timings.queue_s)
            self._count_requests(waiting=-1, running=1)
        started = min(output.images, admitted.waiting)
        self._count(admitted, queued=-started, running=started)

    def _answered(self, admitted: _Admitted) -> None:
        if admitted.started_at is not None:
            per_image = (self._clock() - admitted.started_at) / max(
                admitted.timings.batch_images, admitted.request.num_images
            )
            previous = self._seconds_per_image
            self._seconds_per_image = (
                per_image if previous is None else 0.8 * previous + 0.2 * per_image
            )

    def _leave(self, admitted: _Admitted) -> None:
        now = self._clock()
        if admitted.started_at is None:
            admitted.timings.queue_s = now - admitted.arrival
            self._count_requests(waiting=-1)
        else:
            admitted.timings.engine_s = now - admitted.started_at
            self._count_requests(running=-1)
        self._count(admitted, queued=-admitted.waiting, running=-admitted.started)

    async def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking work, let what was admitted finish for at most `drain_timeout_s`, then
        close the engine."""
        if self._close_started:
            return
        self._close_started = self._closing = True
        deadline = time.monotonic() + drain_timeout_s
        # A once-per-process wait: polling keeps admission free of an idle event.
        while self._queued_images + self._running_images and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        try:
            await self._engine.close()
        finally:
            self._closed.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """vLLM's synchronous shutdown hook: from another thread, runs `close` on the serving
        loop and waits; otherwise only stops taking work (the loop's owner closes)."""
        if self._closed.is_set():
            return
        loop = self._loop
        if loop is not None and loop.is_running() and not _on_loop_thread(loop):
            asyncio.run_coroutine_threadsafe(self.close(timeout or 0.0), loop).result()
            return
        # Past the loop: take nothing new; the loop's owner closes the engine as it ends (the
        # launcher does, when serving ends).
        self._closing = True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
