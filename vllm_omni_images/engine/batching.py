"""`BatchingEngine`: an `ImageEngine` that batches requests for a `PipelineRunner`, one
blocking call at a time on one engine thread; its faults are in docs/architecture.md, "Faults"."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from vllm_omni_images.engine.base import (
    EngineObserver,
    EngineOutput,
    EngineRequest,
    FinalImages,
    ImageEngine,
    ImagesStarted,
    Inbox,
    LoRAAdapter,
    Message,
    ModelDefaults,
    NoObserver,
    PreviewImages,
    notify,
)
from vllm_omni_images.engine.batch_planning import (
    NO_BATCH_YET,
    BatchSlice,
    LastAdapter,
    adapter_of,
    batch_capacity,
    company_wait_s,
    form_batch,
    split_in_halves,
)
from vllm_omni_images.engine.cpu_priority import yield_cpu_to_serving
from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineOutOfMemoryError,
    GenerationCancelled,
    may_be_one_requests,
)
from vllm_omni_images.engine.hang_watch import HangWatch
from vllm_omni_images.engine.memory_budget import PixelBudgetSetting, resolve_pixel_budget
from vllm_omni_images.engine.prompt_tokens import PromptTokenCounter

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
"""After each denoising step, with (step, total steps); may raise `GenerationCancelled`."""

PreviewCallback = Callable[[int, int, list[Image.Image]], None]
"""On the engine thread, cheap: (request's position in the call, preview index, its images)."""


class PipelineRunner(Protocol):
    """What `BatchingEngine` drives: a loaded pipeline, run one blocking call at a time."""

    @property
    def defaults(self) -> ModelDefaults: ...

    @property
    def prompt_tokens(self) -> PromptTokenCounter:
        """Counts prompt tokens as the pipeline's text encoder reads them."""
        ...

    def run(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[list[Image.Image]]:
        """Each request's `num_images` images, in seed order, from one call of requests that
        share `batch_key`; raises `EngineOutOfMemoryError`, or `GenerationCancelled` from
        `on_step`."""
        ...

    def add_lora(self, adapter: LoRAAdapter) -> None:
        """On the engine thread, between calls: read and check `adapter`, or raise
        `LoRAAdapterError`."""
        ...

    def unavailable_adapters(self) -> frozenset[int]:
        """From any thread: adapters whose files could not be read again when a call needed
        them (that call raised `LoRAAdapterUnavailableError`)."""
        ...

    def close(self) -> None:
        """Release the model's memory."""
        ...


@dataclass(frozen=True)
class BatchingConfig:
    """How requests are batched and when a call is taken as hung (the `--image-*` flags)."""

    max_batch_size: int
    """Images per pipeline call; a single request with more images still runs, alone."""
    batch_delay_ms: float
    """How long a non-full batch waits for company, from its oldest request's arrival."""
    hang_grace_s: float | None
    """How long a call asked to stop may run on before the engine is hung; `None`: never."""
    max_pixels_in_flight: PixelBudgetSetting = None
    """The engine's pixel budget: pixels per call, and so in flight (for vllm-omni: handed to
    it); `auto`: from the memory available (`memory_budget.resolve_pixel_budget`); `None`: none.
    """

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_delay_ms < 0:
            raise ValueError(f"batch_delay_ms must be >= 0, got {self.batch_delay_ms}")
        if self.hang_grace_s is not None and self.hang_grace_s <= 0:
            raise ValueError(f"hang_grace_s must be > 0, got {self.hang_grace_s}")


@dataclass(eq=False)
class _Pending:
    request: EngineRequest
    arrival: float
    inbox: Inbox = field(default_factory=Inbox)
    batch: _Batch | None = None
    settled: bool = False
    """Its last message (images or an exception) is sent."""
    withdrawn: bool = False

    def send(self, message: Message) -> None:
        if not self.settled:
            self.settled = isinstance(message, (FinalImages, BaseException))
            self.inbox.put(message)

    @property
    def wanted(self) -> bool:
        return not (self.settled or self.withdrawn)


@dataclass(eq=False)
class _Batch:
    items: list[_Pending]
    # Read by `on_step` on the engine thread, set on the event loop.
    cancel: threading.Event = field(default_factory=threading.Event)
    call: asyncio.Future[list[list[Image.Image]]] | None = None
    """The runner call running now (one of several after running out of memory)."""

    @property
    def num_images(self) -> int:
        return sum(item.request.num_images for item in self.items)


@dataclass(eq=False)
class _BatchRun:
    """One batch's images gathered so far per request, over one or (out of memory) more calls."""

    batch: _Batch
    images: list[list[Image.Image | None]] = field(init=False)
    previews_sent: list[set[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.images = [[None] * item.request.num_images for item in self.batch.items]
        self.previews_sent = [set() for _ in self.batch.items]

    def wants(self, index: int) -> bool:
        return self.batch.items[index].wanted

    def request_for(self, part: BatchSlice) -> EngineRequest:
        """The request, or its seeds of `part` without previews."""
        request = self.batch.items[part.index].request
        if part.num_images == request.num_images:
            return request
        return dataclasses.replace(
            request, seeds=request.seeds[part.start : part.stop], partial_images=0
        )

    def preview(self, index: int, preview: int, images: list[Image.Image]) -> None:
        """On the loop: request `index`'s preview, sent once (a retried call decodes it again)."""
        if preview not in self.previews_sent[index]:
            self.previews_sent[index].add(preview)
            self.batch.items[index].send(PreviewImages(preview, images))

    def deliver(self, parts: Sequence[BatchSlice], results: list[list[Image.Image]]) -> None:
        for part, images in zip(parts, results, strict=True):
            if not self.wants(part.index):
                continue
            gathered = self.images[part.index]
            gathered[part.start : part.stop] = images
            if all(image is not None for image in gathered):
                final = [image for image in gathered if image is not None]
                self.batch.items[part.index].send(FinalImages(final))

    def fail(self, parts: Sequence[BatchSlice], error: BaseException) -> None:
        for index in dict.fromkeys(part.index for part in parts):
            self.batch.items[index].send(error)


class BatchingEngine(ImageEngine):
    """Batches requests for a `PipelineRunner`."""

    def __init__(
        self,
        runner: PipelineRunner,
        config: BatchingConfig,
        *,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.runner = runner
        self.prompt_tokens = runner.prompt_tokens
        self._config = config
        self._clock = clock
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="image-engine", initializer=yield_cpu_to_serving
        )
        self._observer = observer or NoObserver()
        self._hang_watch = HangWatch(
            self._config.hang_grace_s, self._fail_waiting, observer=self._observer, clock=clock
        )
        self._queue: list[_Pending] = []
        self._batch: _Batch | None = None
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._died: str | None = None
        self._last_adapter: LastAdapter = NO_BATCH_YET
        """The adapter of the last batch (`batch_planning.adapter_of`), whose turn is over."""
        # One call at a time: a call's pixels are all the engine's in flight.
        self.max_pixels_in_flight = resolve_pixel_budget(
            config.max_pixels_in_flight, runner.defaults, getattr(runner, "device", "cpu")
        )

    @property
    def defaults(self) -> ModelDefaults:
        return self.runner.defaults

    def check_health(self) -> None:
        if self._died is not None:
            raise EngineDiedError(self._died)
        if (hung := self._hang_watch.error()) is not None:
            raise hung

    def check_admission(self, num_images: int) -> None:
        if self._closed and self._died is None:
            raise EngineClosedError()
        self.check_health()

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._closed:  # its worker is gone: nothing would answer
            raise EngineClosedError() if self._died is None else EngineDiedError(self._died)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name="image-batching-engine"
            )
        pending = _Pending(request, self._clock())
        self._queue.append(pending)
        self._arrived.set()
        try:
            async with contextlib.aclosing(pending.inbox.outputs()) as outputs:
                async for output in outputs:
                    yield output
        finally:
            if not pending.settled:
                self._withdraw(pending)

    async def add_lora(self, adapter: LoRAAdapter) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self.runner.add_lora, adapter
        )

    def unavailable_adapters(self) -> frozenset[int]:
        return self.runner.unavailable_adapters()

    async def close(self) -> None:
        """Fail waiting requests, let the running batch finish (unless hung), release the model."""
        self._closed = True
        self._fail_waiting(EngineClosedError())
        self._arrived.set()
        if self._worker is not None:
            hung = asyncio.ensure_future(self._hang_watch.hung.wait())
            await asyncio.wait([self._worker, hung], return_when=asyncio.FIRST_COMPLETED)
            hung.cancel()
            await asyncio.wait([hung])
            if not self._worker.done():
                # A hung call may never return: do not wait for it (its thread is left behind).
                logger.error("Shutting down with the image engine hung; its call is abandoned.")
                self._worker.cancel()
                await asyncio.wait([self._worker])
        if self._owns_executor:
            self._executor.shutdown(wait=False)
        self.runner.close()

    def _withdraw(self, pending: _Pending) -> None:
        """The stream closed early: drop the request, or abandon it in its batch."""
        pending.withdrawn = True
        batch = pending.batch
        if batch is None:
            if pending in self._queue:
                self._queue.remove(pending)
            return
        if not batch.cancel.is_set() and not any(item.wanted for item in batch.items):
            batch.cancel.set()
            self._hang_watch.stopping(
                batch,
                lambda: self._batch is batch and batch.call is not None and not batch.call.done(),
                f"a batch of {batch.num_images} image(s)",
            )

    def _fail_waiting(self, error: BaseException) -> None:
        waiting, self._queue = self._queue, []
        for pending in waiting:
            pending.send(error)

    async def _run(self) -> None:
        try:
            while (batch := await self._next_batch()) is not None:
                await self._run_batch(batch)
        except Exception as error:
            logger.exception("The batching engine's worker stopped")
            self._died = f"its batching worker stopped ({type(error).__name__}: {error})"
        finally:
            # Whatever stopped the worker, no accepted request may be left hanging.
            self._closed = True
            self._fail_waiting(EngineClosedError())

    async def _next_batch(self) -> _Batch | None:
        """Wait for work, then take the next batch off the queue (`None` once closed)."""
        delay_over_for: _Pending | None = None
        while True:
            if self._closed:
                return None
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            max_images, max_pixels = self._config.max_batch_size, self.max_pixels_in_flight
            indices = form_batch(
                [p.request for p in self._queue], max_images, self._last_adapter, max_pixels
            )
            head = self._queue[indices[0]]
            wait_s = 0.0
            if head is not delay_over_for:
                images = sum(self._queue[i].request.num_images for i in indices)
                wait_s = company_wait_s(
                    images,
                    batch_capacity(head.request, max_images, max_pixels),
                    head.arrival,
                    self._clock(),
                    self._config.batch_delay_ms / 1000,
                )
            if wait_s > 0:
                # Any arrival re-forms the batch; a timeout means the head waited long enough.
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait_s)
                except TimeoutError:
                    delay_over_for = head
                continue
            chosen = set(indices)
            batch = _Batch([self._queue[i] for i in indices])
            self._last_adapter = adapter_of(head.request)
            self._queue = [p for i, p in enumerate(self._queue) if i not in chosen]
            return batch

    async def _run_batch(self, batch: _Batch) -> None:
        loop = asyncio.get_running_loop()
        run = _BatchRun(batch)
        start = self._clock()
        self._batch = batch
        for pending in batch.items:
            pending.batch = batch
            pending.send(ImagesStarted(pending.request.num_images, batch.num_images))
        notify(self._observer.on_batch_start, batch.num_images)
        last_step = start

        def on_step(step: int, total: int) -> None:  # the engine thread
            nonlocal last_step
            now = self._clock()
            notify(self._observer.on_step, now - last_step)
            last_step = now
            if batch.cancel.is_set():
                raise GenerationCancelled()

        def on_preview(position: int, index: int, images: list[Image.Image]) -> None:
            loop.call_soon_threadsafe(run.preview, position, index, images)

        whole = [BatchSlice(i, 0, item.request.num_images) for i, item in enumerate(batch.items)]
        try:
            await self._run_slices(run, whole, on_step, on_preview)
        finally:
            # Every request is answered by now unless the worker itself was cancelled.
            for pending in batch.items:
                pending.send(EngineClosedError())
            self._batch = None
        notify(self._observer.on_batch_end, self._clock() - start)

    async def _run_slices(
        self,
        run: _BatchRun,
        parts: Sequence[BatchSlice],
        on_step: StepCallback,
        on_preview: PreviewCallback,
    ) -> None:
        """Run the wanted `parts` in one call and answer each request done or failed; out of
        memory, run each half in turn, down to single images; failed otherwise (an error that
        may be one request's: `may_be_one_requests`), run each request alone, once."""
        parts = [part for part in parts if run.wants(part.index)]
        if not parts:
            return
        requests = [run.request_for(part) for part in parts]

        def preview(position: int, index: int, images: list[Image.Image]) -> None:
            on_preview(parts[position].index, index, images)

        out_of_memory: str | None = None
        failed: str | None = None
        call = asyncio.get_running_loop().run_in_executor(
            self._executor, self.runner.run, requests, on_step, preview
        )
        run.batch.call = call
        try:
            try:
                results = await call
            finally:
                if not call.cancelled():  # it returned; cancelled: the worker was stopped
                    self._hang_watch.returned(run.batch)
        except EngineOutOfMemoryError as error:
            out_of_memory = str(error) or type(error).__name__
        except Exception as error:
            if isinstance(error, GenerationCancelled) and run.batch.cancel.is_set():
                pass
            elif may_be_one_requests(error) and len({part.index for part in parts}) > 1:
                failed = repr(error)
            else:
                logger.warning("Image batch of %d request(s) failed: %r", len(requests), error)
                run.fail(parts, error)
        else:
            run.deliver(parts, results)
        # Retried out here, not in the except block, so that the failed call's traceback (and
        # whatever memory its frames hold) is gone before the next call.
        if failed is not None:
            await self._run_each_alone(run, parts, failed, on_step, on_preview)
        elif out_of_memory is not None:
            await self._run_halves(run, parts, out_of_memory, on_step, on_preview)

    async def _run_each_alone(
        self,
        run: _BatchRun,
        parts: Sequence[BatchSlice],
        failure: str,
        on_step: StepCallback,
        on_preview: PreviewCallback,
    ) -> None:
        """A call of several requests failed, maybe for one of them: run each request's part
        alone, in order, so that only a request that fails alone fails (with its own error)."""
        logger.warning(
            "A batch of %d requests failed (%s); retrying each request alone.", len(parts), failure
        )
        notify(self._observer.on_batch_isolated, len(parts))
        for part in parts:  # one part per request: a split cuts a request once at most
            await self._run_slices(run, [part], on_step, on_preview)

    async def _run_halves(
        self,
        run: _BatchRun,
        parts: Sequence[BatchSlice],
        out_of_memory: str,
        on_step: StepCallback,
        on_preview: PreviewCallback,
    ) -> None:
        """A call ran out of memory: run each half of its images in turn; a single image that
        ran out of memory fails its request."""
        images = sum(part.num_images for part in parts)
        if images == 1:
            request = run.request_for(parts[0])
            logger.warning(
                "One %dx%d image of request %s ran out of device memory even alone; the request "
                "fails: %s",
                request.width,
                request.height,
                request.request_id or "(no id)",
                out_of_memory,
            )
            message = f"one {request.width}x{request.height} image did not fit, even alone"
            run.fail(parts, EngineOutOfMemoryError(message))
            return
        first, second = split_in_halves(parts)
        logger.warning(
            "A batch of %d images ran out of device memory (%s); retrying it as %d + %d images.",
            images,
            out_of_memory,
            sum(part.num_images for part in first),
            sum(part.num_images for part in second),
        )
        notify(self._observer.on_batch_split, images)
        await self._run_slices(run, first, on_step, on_preview)
        await self._run_slices(run, second, on_step, on_preview)
