"""An asyncio scheduler: admission for every engine, and batching for engines that do not batch.

Callers `await submit(request)` and get exactly one outcome: their images or one exception.
Admission is the same for every engine: the queue limit (429), the request timeout, withdrawal
when the caller goes away, and the metrics hooks.

What happens to an admitted request depends on the engine, so that requests are batched once,
by one queue (docs/architecture.md, "One queue, one batcher"):

- An `ImageEngine` (diffusers) cannot batch by itself. One worker per engine takes the oldest
  waiting request, adds compatible waiting requests up to `max_batch_size` images, and runs the
  batch on a single engine thread.
- A `QueueingImageEngine` (vllm-omni) batches with its own scheduler, which knows what its
  pipeline can run together. Each admitted request is handed over at once; it counts as queued
  until the engine reports its images started, and a timeout or a cancel aborts it there.

Faults are contained to the requests they hit (an `ImageEngine`'s batches; a `QueueingImageEngine`
handles its own):

- An engine exception fails the requests of the call it came from, and the worker goes on with
  the next batch.
- Out of device memory (`EngineOutOfMemoryError`): the call's images are split in two halves
  (at the middle image, so a request's images may go to both; image `i` depends only on
  `seeds[i]`, so its images are the same) and each half runs in turn, halving again down to
  single images. Only a request with an image that does not fit even alone fails, with
  `EngineOutOfMemoryError`; the others get their images, assembled per request in seed order,
  each request answered as soon as its last image is in. A request withdrawn between tries is
  not retried.
- A hung engine: a call still running `hang_grace_s` after every request in it timed out or
  went away marks the engine hung (`hung_error`): waiting requests fail with `EngineHungError`
  and new ones are refused with it, until the call returns. For a `QueueingImageEngine`, the
  same holds for a started request that has not left the engine `hang_grace_s` after it was
  aborted.

This module must stay importable without vLLM (the GPU benchmarks run it with diffusers only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol

from PIL import Image

from vllm_omni_images.engine.base import (
    AnyImageEngine,
    EngineJob,
    EngineRequest,
    ImageEngine,
    PreviewSink,
    QueueingImageEngine,
    StepCallback,
    batch_key,
)
from vllm_omni_images.engine.cpu_priority import yield_cpu_to_serving
from vllm_omni_images.engine.errors import (
    EngineError,
    EngineHungError,
    EngineOutOfMemoryError,
    GenerationCancelled,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
    SchedulerClosedError,
)

__all__ = [
    "BatchSlice",
    "ImageScheduler",
    "RequestTimings",
    "SchedulerConfig",
    "SchedulerObserver",
    "company_wait_s",
    "form_batch",
    "split_in_halves",
]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")


@dataclass(frozen=True)
class SchedulerConfig:
    """How requests are batched and how much waiting work is accepted."""

    max_batch_size: int = 4
    """Images per engine call; a single request with more images still runs, alone. (A
    `QueueingImageEngine` is built with this limit and applies it itself.)"""
    batch_delay_s: float = 0.0
    """How long a non-full batch waits for compatible company, counted from its oldest
    request's arrival. (Likewise applied by a `QueueingImageEngine` itself.)"""
    max_queue_images: int = 256
    """Waiting images beyond which new requests are refused."""
    request_timeout_s: float | None = 600.0
    """Limit on queue wait plus run time; `None` for none."""
    hang_grace_s: float | None = 60.0
    """How long an engine call may go on after every request in it timed out or went away (it
    is asked to stop at its next step) before the engine is taken as hung; `None`: never."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_delay_s < 0:
            raise ValueError(f"batch_delay_s must be >= 0, got {self.batch_delay_s}")
        if self.max_queue_images < 1:
            raise ValueError(f"max_queue_images must be >= 1, got {self.max_queue_images}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.hang_grace_s is not None and self.hang_grace_s <= 0:
            raise ValueError(f"hang_grace_s must be > 0, got {self.hang_grace_s}")


class SchedulerObserver(Protocol):
    """Hooks for metrics. Subclass it to inherit its no-op defaults.

    `on_step` runs on the engine thread, every other hook on the event loop; all must be
    cheap. An exception from a hook is logged and otherwise ignored.
    """

    def on_queued(self, request: EngineRequest) -> None:
        """A request was accepted into the queue."""
        return None

    def on_rejected(self, request: EngineRequest) -> None:
        """A request was refused because the queue is full."""
        return None

    def on_batch_start(self, requests: Sequence[EngineRequest], queue_wait_s: list[float]) -> None:
        """A batch was handed to the engine; `queue_wait_s[i]` is request i's wait."""
        return None

    def on_step(self, step_s: float) -> None:
        """A denoising step finished `step_s` after the previous one (or the batch start)."""
        return None

    def on_batch_end(
        self, requests: Sequence[EngineRequest], engine_s: float, outcome: str
    ) -> None:
        """The engine is done with the batch (every out-of-memory retry included): `outcome` is
        "ok" (no request of it failed), "error" or "cancelled"."""
        return None

    def on_batch_split(self, images: int) -> None:
        """An engine call of `images` images ran out of memory; its halves run next."""
        return None

    def on_engine_hung(self, hung: bool) -> None:
        """The engine was taken as hung (`True`), or its call returned at last (`False`)."""
        return None

    def on_queue_depth(self, images: int) -> None:
        """The number of waiting images changed."""
        return None


class _NoObserver(SchedulerObserver):
    pass


def form_batch(queue: Sequence[EngineRequest], max_images: int) -> list[int]:
    """Indices into `queue` (oldest first) of the requests that should run next.

    The oldest request always goes, whatever its size, so no request starves. Later requests
    with its batch key join in arrival order while the total stays within `max_images`; one
    that does not fit is skipped and the scan goes on. A request is never split.
    """
    if not queue:
        return []
    key = batch_key(queue[0])
    chosen = [0]
    total = queue[0].num_images
    for index in range(1, len(queue)):
        if total >= max_images:
            break
        request = queue[index]
        if total + request.num_images <= max_images and batch_key(request) == key:
            chosen.append(index)
            total += request.num_images
    return chosen


@dataclass(frozen=True)
class BatchSlice:
    """Images `start` to `stop` (indices into its seeds) of request `index` of a batch."""

    index: int
    start: int
    stop: int

    @property
    def num_images(self) -> int:
        return self.stop - self.start


def split_in_halves(slices: Sequence[BatchSlice]) -> tuple[list[BatchSlice], list[BatchSlice]]:
    """The two halves to retry an engine call that ran out of memory: the first holds the first
    half of its images (the larger half when the count is odd), the second the rest, in order.
    A request whose images straddle the middle is split between the halves."""
    total = sum(part.num_images for part in slices)
    if total < 2:
        raise ValueError("a single image cannot be split")
    middle = (total + 1) // 2
    first: list[BatchSlice] = []
    second: list[BatchSlice] = []
    seen = 0
    for part in slices:
        if seen + part.num_images <= middle:
            first.append(part)
        elif seen >= middle:
            second.append(part)
        else:
            cut = part.start + middle - seen
            first.append(BatchSlice(part.index, part.start, cut))
            second.append(BatchSlice(part.index, cut, part.stop))
        seen += part.num_images
    return first, second


def company_wait_s(
    batch_images: int, max_images: int, head_arrival: float, now: float, delay_s: float
) -> float:
    """How much longer a batch should wait for compatible requests before it runs.

    The delay counts from the oldest request's arrival, so a request that already waited
    that long does not wait again; a full batch never waits.
    """
    if batch_images >= max_images:
        return 0.0
    return max(0.0, head_arrival + delay_s - now)


@dataclass
class RequestTimings:
    """Where one request's time went; filled in by the scheduler as it goes."""

    queue_s: float = 0.0
    """From arrival until its batch started (or until it left the queue)."""
    engine_s: float = 0.0
    """Its batch's pipeline call."""
    batch_images: int = 0
    """Images of the batch it ran in, its own included."""


@dataclass(eq=False)
class _Pending:
    request: EngineRequest
    future: asyncio.Future[list[Image.Image]]
    arrival: float
    timings: RequestTimings = field(default_factory=RequestTimings)
    batch: _Batch | None = None
    abandoned: bool = False
    # Hand-over mode only: the engine's handle, and how many images wait or run in it.
    job: EngineJob | None = None
    waiting_images: int = 0
    started_images: int = 0
    started_at: float | None = None
    settled: bool = False


@dataclass(eq=False)
class _Batch:
    items: list[_Pending]
    # Read by `on_step` on the engine thread, set on the event loop.
    cancel: threading.Event = field(default_factory=threading.Event)
    call: asyncio.Future[list[list[Image.Image]]] | None = None
    """The engine call running now (one of several after running out of memory)."""

    @property
    def num_images(self) -> int:
        return sum(item.request.num_images for item in self.items)


@dataclass(eq=False)
class _BatchRun:
    """One batch's way through the engine: the images gathered so far per request (after
    running out of memory, a request's images may come from several calls) and the outcome."""

    batch: _Batch
    start: float
    outcome: str = "ok"
    images: list[list[Image.Image | None]] = field(init=False)
    previews_sent: list[set[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.images = [[None] * item.request.num_images for item in self.batch.items]
        self.previews_sent = [set() for _ in self.batch.items]

    def wants(self, index: int) -> bool:
        """Whether request `index` still waits for images (not answered, failed or withdrawn)."""
        return not self.batch.items[index].future.done()

    def request_for(self, part: BatchSlice) -> EngineRequest:
        """What the engine is asked for `part`: the request, or the seeds of the part."""
        request = self.batch.items[part.index].request
        if part.num_images < request.num_images:
            # A preview shows all of a request's images; a part cannot make one.
            return dataclasses.replace(
                request, seeds=request.seeds[part.start : part.stop], on_preview=None
            )
        if request.on_preview is None:
            return request
        return dataclasses.replace(
            request, on_preview=_once_each(request.on_preview, self.previews_sent[part.index])
        )

    def deliver(
        self, parts: Sequence[BatchSlice], results: list[list[Image.Image]], now: float
    ) -> None:
        for part, images in zip(parts, results, strict=True):
            if not self.wants(part.index):
                continue
            gathered = self.images[part.index]
            gathered[part.start : part.stop] = images
            if all(image is not None for image in gathered):
                self._settle(part.index, now)
                self.batch.items[part.index].future.set_result(
                    [image for image in gathered if image is not None]
                )

    def fail(self, parts: Sequence[BatchSlice], error: BaseException, now: float) -> None:
        for index in dict.fromkeys(part.index for part in parts):
            if self.wants(index):
                self._settle(index, now)
                self.batch.items[index].future.set_exception(error)
                self.outcome = "error"

    def _settle(self, index: int, now: float) -> None:
        # Recorded before the caller is woken, so its timings are complete.
        self.batch.items[index].timings.engine_s = now - self.start


def _once_each(sink: PreviewSink, sent: set[int]) -> PreviewSink:
    """`sink`, called at most once per preview index (a retried call decodes them again)."""

    def once(index: int, images: list[Image.Image]) -> None:
        if index not in sent:
            sent.add(index)
            sink(index, images)

    return once


class ImageScheduler:
    """Queues requests for one engine: runs them in batches, one batch at a time, or hands them
    to an engine that queues and batches by itself."""

    def __init__(
        self,
        engine: AnyImageEngine,
        config: SchedulerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        executor: concurrent.futures.Executor | None = None,
        observer: SchedulerObserver | None = None,
    ) -> None:
        self._engine = engine
        self._config = config
        self._clock = clock
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="image-engine", initializer=yield_cpu_to_serving
        )
        self._observer: SchedulerObserver = observer or _NoObserver()
        self._queue: list[_Pending] = []
        self._queued_images = 0
        self._handed_over_running = 0
        self._handed_over: set[_Pending] = set()
        self._batch: _Batch | None = None
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._seconds_per_image: float | None = None
        self._hung_since: float | None = None
        self._hung_jobs: set[_Pending] = set()
        """Hand-over mode: the aborted requests that had not left the engine in time."""
        self._hung_event = asyncio.Event()

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def queued_images(self) -> int:
        """Images waiting in the queue (not running)."""
        return self._queued_images

    @property
    def running_images(self) -> int:
        """Images the engine is working on."""
        batch = self._batch.num_images if self._batch is not None else 0
        return batch + self._handed_over_running

    @property
    def queue_depth(self) -> int:
        """Requests waiting in the queue."""
        return len(self._queue)

    def hung_error(self) -> EngineHungError | None:
        """The error requests get while the engine is taken as hung; `None` while it is not."""
        if self._hung_since is None or self._config.hang_grace_s is None:
            return None
        return EngineHungError(self._config.hang_grace_s)

    def start(self) -> None:
        """Start the worker on the running event loop; calling it again does nothing."""
        if self._worker is None and not self._closed:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name="image-scheduler"
            )

    async def close(self) -> None:
        """Refuse new work, fail waiting requests, and let the running batch (or the requests a
        `QueueingImageEngine` has started, for at most `hang_grace_s`) finish."""
        self._closed = True
        self._fail_queued(SchedulerClosedError())
        self._arrived.set()
        if self._worker is not None:
            hung = asyncio.ensure_future(self._hung_event.wait())
            await asyncio.wait([self._worker, hung], return_when=asyncio.FIRST_COMPLETED)
            hung.cancel()
            await asyncio.wait([hung])
            if not self._worker.done():
                # A hung call may never return: do not wait for it (its thread is left behind).
                logger.error("Shutting down with the image engine hung; its call is abandoned.")
                self._worker.cancel()
                await asyncio.wait([self._worker])
        if self._handed_over:
            # Started requests finish, unless the engine is stuck: wait at most the hang grace
            # (the caller then closes the engine, which fails what is left).
            _, left = await asyncio.wait(
                [pending.future for pending in self._handed_over],
                timeout=self._config.hang_grace_s,
            )
            if left:
                logger.error(
                    "Shutting down with %d request(s) still running in the image engine after "
                    "%g s; they are abandoned.",
                    len(left),
                    self._config.hang_grace_s,
                )
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    async def submit(
        self, request: EngineRequest, timings: RequestTimings | None = None
    ) -> list[Image.Image]:
        """Queue `request` and wait for its images, in seed order; `timings`, if given, is
        filled in with where the request's time went.

        Raises at once `RequestTooLargeError` when the request has more images than the
        whole queue holds and `QueueFullError` when the queue has no room now; later
        `RequestTimeoutError` after `request_timeout_s`, `SchedulerClosedError` on shutdown,
        and the engine's own exception when its batch fails (`EngineOutOfMemoryError` only
        when an image does not fit even alone). While the engine is taken as hung, raises
        `EngineHungError`, at once or as the request waits. Cancelling the caller withdraws
        the request.
        """
        if request.num_images < 1:
            raise ValueError("A request needs at least one seed.")
        if self._closed:
            raise SchedulerClosedError()
        if (hung := self.hung_error()) is not None:
            raise hung
        if request.num_images > self._config.max_queue_images:
            raise RequestTooLargeError(request.num_images, self._config.max_queue_images)
        if self._queued_images + request.num_images > self._config.max_queue_images:
            self._notify(self._observer.on_rejected, request)
            raise QueueFullError(self._retry_after_s(request.num_images))
        pending = _Pending(request, asyncio.get_running_loop().create_future(), self._clock())
        if timings is not None:
            pending.timings = timings
        if isinstance(self._engine, QueueingImageEngine):
            self._hand_over(self._engine, pending)  # raises if the engine cannot take it
        else:
            self.start()
        self._queue.append(pending)
        self._queued_images += request.num_images
        pending.waiting_images = request.num_images
        self._notify(self._observer.on_queued, request)
        self._notify(self._observer.on_queue_depth, self._queued_images)
        self._arrived.set()

        deadline = asyncio.timeout(self._config.request_timeout_s)
        try:
            async with deadline:
                return await pending.future
        except TimeoutError:
            if not deadline.expired():
                raise  # the engine's own TimeoutError, set on the future
            self._withdraw(pending)
            raise RequestTimeoutError(self._config.request_timeout_s or 0.0) from None
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise

    def _retry_after_s(self, num_images: int) -> float:
        """A guess at when enough waiting images will have started for `num_images` to fit."""
        excess = self._queued_images + num_images - self._config.max_queue_images
        seconds_per_image = self._seconds_per_image or 1.0
        return max(1.0, round(excess * seconds_per_image, 1))

    def _withdraw(self, pending: _Pending) -> None:
        """The caller gave up: drop a queued request, or abandon a running one."""
        if pending.job is not None:
            pending.job.abort()
            if pending.started_images == 0:  # the engine drops a waiting request at once
                pending.timings.queue_s = self._clock() - pending.arrival
                self._forget_waiting(pending)
            elif self._config.hang_grace_s is not None:
                # A started request leaves the engine at its next step (step mode) or when its
                # batch returns: if it has not `hang_grace_s` later, the engine is stuck.
                asyncio.get_running_loop().call_later(
                    self._config.hang_grace_s, self._check_left, pending
                )
            return
        if pending.batch is None:
            pending.timings.queue_s = self._clock() - pending.arrival
            if pending in self._queue:
                self._queue.remove(pending)
                self._queued_images -= pending.request.num_images
                self._notify(self._observer.on_queue_depth, self._queued_images)
            return
        pending.abandoned = True
        batch = pending.batch
        if not batch.cancel.is_set() and all(
            item.abandoned or item.future.done() for item in batch.items
        ):
            self._stop_batch(batch)

    def _stop_batch(self, batch: _Batch) -> None:
        """No one waits for `batch` any more: stop it at its next step, and take the engine as
        hung if its call has not returned `hang_grace_s` later."""
        batch.cancel.set()
        if self._config.hang_grace_s is not None:
            asyncio.get_running_loop().call_later(
                self._config.hang_grace_s, self._check_stopped, batch
            )

    def _check_stopped(self, batch: _Batch) -> None:
        call = batch.call
        if self._batch is not batch or call is None or call.done() or self._hung_since is not None:
            return
        self._take_as_hung(f"a batch of {batch.num_images} image(s)")

    def _check_left(self, pending: _Pending) -> None:
        """Hand-over mode: `pending` was aborted `hang_grace_s` ago, after it started. The
        engine is hung until every such request has left (not only the first to be late)."""
        if pending.settled:
            return
        self._hung_jobs.add(pending)
        if self._hung_since is None:
            self._take_as_hung(f"the {pending.started_images} started image(s) of a request")

    def _take_as_hung(self, what: str) -> None:
        self._hung_since = self._clock()
        self._hung_event.set()
        error = self.hung_error()
        assert error is not None
        logger.error(
            "The image engine has not returned from %s %g s after every request in it timed "
            "out or went away: it is taken as hung. /health answers 503, and requests fail "
            "with 503 until the call returns; %d waiting request(s) failed.",
            what,
            error.grace_s,
            len(self._queue),
        )
        self._fail_queued(error)
        self._notify(self._observer.on_engine_hung, True)

    def _call_returned(self) -> None:
        if self._hung_since is None:
            return
        logger.warning(
            "The image engine returned from its hung call after %.1f s more; it serves again "
            "(/health answers 200).",
            self._clock() - self._hung_since,
        )
        self._hung_since = None
        self._hung_event.clear()
        self._notify(self._observer.on_engine_hung, False)

    def _fail_queued(self, error: BaseException) -> None:
        queued = [p for p in self._queue if p.started_images == 0]
        for pending in queued:
            if pending.job is not None:
                pending.job.abort()
            self._forget_waiting(pending)
            _set_exception(pending.future, error)

    # Hand-over mode: the engine queues and batches; these keep the counts and outcomes.

    def _hand_over(self, engine: QueueingImageEngine, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()

        def on_started(images: int) -> None:  # any thread
            _call_soon(loop, self._images_started, pending, images)

        job = engine.submit(pending.request, on_started)
        pending.job = job
        self._handed_over.add(pending)
        job.future.add_done_callback(lambda _: _call_soon(loop, self._job_done, pending))

    def _images_started(self, pending: _Pending, images: int) -> None:
        if pending.settled or pending.waiting_images == 0:
            return
        images = min(images, pending.waiting_images)
        pending.waiting_images -= images
        pending.started_images += images
        self._queued_images -= images
        self._handed_over_running += images
        if pending.waiting_images == 0 and pending in self._queue:
            self._queue.remove(pending)
        if pending.started_at is None:
            pending.started_at = self._clock()
            pending.timings.queue_s = pending.started_at - pending.arrival
            pending.timings.batch_images = pending.request.num_images
            self._notify(
                self._observer.on_batch_start, [pending.request], [pending.timings.queue_s]
            )
        self._notify(self._observer.on_queue_depth, self._queued_images)

    def _job_done(self, pending: _Pending) -> None:
        assert pending.job is not None
        if pending.settled:
            return
        pending.settled = True
        self._handed_over.discard(pending)
        if pending in self._hung_jobs:
            self._hung_jobs.discard(pending)
            if not self._hung_jobs:
                self._call_returned()
        self._forget_waiting(pending)
        self._handed_over_running -= pending.started_images
        engine_s = 0.0
        if pending.started_at is not None:
            engine_s = self._clock() - pending.started_at
        pending.timings.engine_s = engine_s
        future = pending.job.future
        error = GenerationCancelled() if future.cancelled() else future.exception()
        if error is None:
            images = future.result()
            outcome = "ok"
            try:
                _check_results([pending.request], [images])
            except EngineError as mismatch:
                error, outcome = mismatch, "error"
            else:
                if not pending.future.done():
                    pending.future.set_result(images)
                self._update_speed(engine_s / pending.request.num_images)
        else:
            outcome = "cancelled" if isinstance(error, GenerationCancelled) else "error"
            if self._closed:
                error = SchedulerClosedError()  # the engine was closed under it
            elif outcome == "error":
                logger.warning("Image request failed in the engine: %r", error)
        if error is not None:
            _set_exception(pending.future, error)
        if pending.started_at is not None:
            self._notify(self._observer.on_batch_end, [pending.request], engine_s, outcome)

    def _forget_waiting(self, pending: _Pending) -> None:
        """Stop counting `pending`'s not-yet-started images as queued."""
        if pending in self._queue:
            self._queue.remove(pending)
        if pending.waiting_images:
            self._queued_images -= pending.waiting_images
            pending.waiting_images = 0
            self._notify(self._observer.on_queue_depth, self._queued_images)

    async def _run(self) -> None:
        try:
            while (batch := await self._next_batch()) is not None:
                await self._run_batch(batch)
        except Exception:
            logger.exception("The image scheduler's worker stopped")
        finally:
            # Whatever stopped the worker, no accepted request may be left hanging.
            self._closed = True
            self._fail_queued(SchedulerClosedError())

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
            head = self._queue[0]
            indices = form_batch([p.request for p in self._queue], self._config.max_batch_size)
            wait_s = 0.0
            if head is not delay_over_for:
                images = sum(self._queue[i].request.num_images for i in indices)
                wait_s = company_wait_s(
                    images,
                    self._config.max_batch_size,
                    head.arrival,
                    self._clock(),
                    self._config.batch_delay_s,
                )
            if wait_s > 0:
                # Any arrival re-forms the batch; a timeout means the head waited long enough.
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait_s)
                except TimeoutError:
                    delay_over_for = head
                continue
            return self._take(indices)

    def _take(self, indices: list[int]) -> _Batch:
        chosen = set(indices)
        batch = _Batch([self._queue[i] for i in indices])
        self._queue = [p for i, p in enumerate(self._queue) if i not in chosen]
        self._queued_images -= batch.num_images
        for pending in batch.items:
            pending.batch = batch
            pending.waiting_images = 0
        self._notify(self._observer.on_queue_depth, self._queued_images)
        return batch

    async def _run_batch(self, batch: _Batch) -> None:
        engine = self._engine
        assert isinstance(engine, ImageEngine)  # only engines that do not batch get batches
        requests = [pending.request for pending in batch.items]
        run = _BatchRun(batch, self._clock())
        self._batch = batch
        for pending in batch.items:
            pending.timings.queue_s = run.start - pending.arrival
            pending.timings.batch_images = batch.num_images
        self._notify(
            self._observer.on_batch_start,
            requests,
            [pending.timings.queue_s for pending in batch.items],
        )
        last_step = run.start

        def on_step(step: int, total: int) -> None:
            nonlocal last_step
            now = self._clock()
            self._notify(self._observer.on_step, now - last_step)
            last_step = now
            if batch.cancel.is_set():
                raise GenerationCancelled()

        whole = [BatchSlice(index, 0, request.num_images) for index, request in enumerate(requests)]
        try:
            await self._run_slices(engine, run, whole, on_step)
        finally:
            # Every future is settled by now unless the worker itself was cancelled mid-batch.
            for pending in batch.items:
                _set_exception(pending.future, SchedulerClosedError())
            self._batch = None
        engine_s = self._clock() - run.start
        if run.outcome == "ok":
            self._update_speed(engine_s / batch.num_images)
        self._notify(self._observer.on_batch_end, requests, engine_s, run.outcome)

    async def _run_slices(
        self,
        engine: ImageEngine,
        run: _BatchRun,
        parts: Sequence[BatchSlice],
        on_step: StepCallback,
    ) -> None:
        """Run the `parts` of `run`'s batch still wanted in one engine call, and settle each
        request whose images are all in, or that failed. Out of memory, run each half of them
        in turn, down to single images (see the module docstring)."""
        parts = [part for part in parts if run.wants(part.index)]
        if not parts:
            return
        requests = [run.request_for(part) for part in parts]
        images = sum(part.num_images for part in parts)
        out_of_memory: str | None = None
        call = asyncio.get_running_loop().run_in_executor(
            self._executor, engine.generate, requests, on_step
        )
        run.batch.call = call
        try:
            try:
                results = await call
            finally:
                if not call.cancelled():  # it returned; cancelled: the worker was stopped
                    self._call_returned()
            _check_results(requests, results)
        except EngineOutOfMemoryError as error:
            out_of_memory = str(error) or type(error).__name__
        except Exception as error:
            if isinstance(error, GenerationCancelled) and run.batch.cancel.is_set():
                if run.outcome == "ok":
                    run.outcome = "cancelled"
            else:
                logger.warning("Image batch of %d request(s) failed: %r", len(requests), error)
                run.fail(parts, error, self._clock())
        else:
            run.deliver(parts, results, self._clock())
        if out_of_memory is None:
            return
        # Retried out here, not in the except block, so that the failed call's traceback (and
        # whatever memory its frames hold) is gone before the next call.
        if images == 1:
            request = requests[0]
            logger.warning(
                "One %dx%d image of request %s ran out of device memory even alone; the request "
                "fails: %s",
                request.width,
                request.height,
                request.request_id or "(no id)",
                out_of_memory,
            )
            message = f"one {request.width}x{request.height} image did not fit, even alone"
            run.fail(parts, EngineOutOfMemoryError(message), self._clock())
            return
        first, second = split_in_halves(parts)
        logger.warning(
            "A batch of %d images ran out of device memory (%s); retrying it as %d + %d images.",
            images,
            out_of_memory,
            sum(part.num_images for part in first),
            sum(part.num_images for part in second),
        )
        self._notify(self._observer.on_batch_split, images)
        await self._run_slices(engine, run, first, on_step)
        await self._run_slices(engine, run, second, on_step)

    def _update_speed(self, seconds_per_image: float) -> None:
        if self._seconds_per_image is None:
            self._seconds_per_image = seconds_per_image
        else:
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds_per_image

    def _notify(self, hook: Callable[_P, None], *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            hook(*args, **kwargs)
        except Exception:
            logger.exception("Scheduler observer hook %s failed", getattr(hook, "__name__", hook))


def _check_results(requests: Sequence[EngineRequest], results: list[list[Image.Image]]) -> None:
    """Refuse a result that cannot be matched to its requests, rather than mis-deliver it."""
    counts = [len(images) for images in results]
    expected = [request.num_images for request in requests]
    if counts != expected:
        raise EngineError(f"The engine returned {counts} images for requests of {expected}.")


def _call_soon(
    loop: asyncio.AbstractEventLoop,
    callback: Callable[_P, None],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> None:
    """Run `callback` on `loop` from any thread; nothing is left to do once the loop is gone."""
    with contextlib.suppress(RuntimeError):  # raised once the loop is closed
        loop.call_soon_threadsafe(lambda: callback(*args, **kwargs))


def _set_exception(future: asyncio.Future[list[Image.Image]], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
