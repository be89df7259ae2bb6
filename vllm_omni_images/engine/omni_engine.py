"""`OmniEngine`: an `ImageEngine` over vllm-omni's `DiffusionEngine`, which runs on a
`LoopThread` of its own and is touched only there, through its public API. vllm-omni is
imported only when one is built."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import TYPE_CHECKING

from PIL import Image

from vllm_omni_images.engine import memory_budget
from vllm_omni_images.engine.base import (
    AdapterStack,
    EngineObserver,
    EngineOutput,
    EngineRequest,
    FinalImages,
    ImageEngine,
    ImagesStarted,
    LoRAAdapter,
    LoRASettings,
    ModelDefaults,
    NoObserver,
    notify,
)
from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineError,
    EngineNotReadyError,
    EngineOutOfMemoryError,
    EngineRequestError,
    GenerationCancelled,
    LoRAAdapterError,
)
from vllm_omni_images.engine.hang_watch import HangWatch
from vllm_omni_images.engine.loop_thread import LoopThread
from vllm_omni_images.engine.model_folder import defaults_for_pipeline_class
from vllm_omni_images.engine.omni_adapters import OmniAdapters
from vllm_omni_images.engine.omni_flight import Flight, ScaledLoRA
from vllm_omni_images.engine.omni_requests import (
    classify_failure,
    pipeline_takes_masks,
    reads_strength,
    refuse_unsupported,
    to_omni_request,
)
from vllm_omni_images.engine.omni_waves import (
    ScheduledWave,
    TryOutcome,
    WaveLog,
    recording_scheduler,
    retry_alone,
    retry_halves,
    retry_key,
    try_outcome,
)
from vllm_omni_images.engine.prompt_tokens import PromptTokenCounter

if TYPE_CHECKING:
    from vllm_omni.diffusion.data import OmniDiffusionConfig
    from vllm_omni.diffusion.diffusion_engine import DiffusionEngine
    from vllm_omni.diffusion.request import OmniDiffusionRequest
    from vllm_omni.lora.request import LoRARequest

logger = logging.getLogger(__name__)

_CANCELLATIONS = (GenerationCancelled, asyncio.CancelledError)


class OmniEngine(ImageEngine):
    """Serves a model through vllm-omni's `DiffusionEngine`."""

    def __init__(
        self,
        config: OmniDiffusionConfig,
        defaults: ModelDefaults | None = None,
        *,
        hang_grace_s: float | None = 60.0,
        observer: EngineObserver | None = None,
        lora: LoRASettings | None = None,
        max_pixels_in_flight: memory_budget.PixelBudgetSetting = None,
    ) -> None:
        """Start vllm-omni's engine for `config` (loads the pipeline, runs its warm-up). With
        `lora` (and `config` built with it) it serves LoRA adapters; with a pixel budget
        (`memory_budget.py`), requests wait their turn before they are handed to vllm-omni."""
        from vllm_omni.diffusion.diffusion_engine import DiffusionEngine
        from vllm_omni.diffusion.io_support import supports_multimodal_input
        from vllm_omni.platforms import current_omni_platform

        assert config.model is not None
        # vllm-omni's `mp` executor needs spawn as the default, as its own stage set-up makes it.
        multiprocessing.set_start_method("spawn", force=True)
        self.model_class_name = config.model_class_name
        self.prompt_tokens = PromptTokenCounter.of_folder(config.model)
        self.takes_images = supports_multimodal_input(config)[0]
        """Whether the pipeline edits an input image (e.g. Qwen-Image-Edit)."""
        self.takes_masks = pipeline_takes_masks(config.model_class_name)
        self.takes_strength = reads_strength(config)
        """Whether the pipeline honours an edit's `strength` (Qwen-Image-Edit's does not)."""
        self._defaults = dataclasses.replace(
            defaults or defaults_for_pipeline_class(config.model_class_name, config.model),
            supports_strength=self.takes_strength,
            supports_partial_images=config.streaming_output,  # pipelines/step_previews.py
        )
        self._observer = observer or NoObserver()
        self._hang_watch = HangWatch(hang_grace_s, self._fail_waiting, observer=self._observer)
        self._died: str | None = None
        self._in_flight: set[Flight] = set()
        self._closed = False
        self._adapters = None if lora is None else OmniAdapters(config.model, lora)
        self._waves: WaveLog[Flight] = WaveLog(self._wave_settled)
        self._retries: dict[str, asyncio.Future[tuple[str, str] | None]] = {}
        """Failed tries waiting for the rest of their wave: their group's batch key."""
        self._engine: DiffusionEngine = DiffusionEngine.make_engine(
            config, recording_scheduler(config, self._waves)
        )
        self._engine.executor.register_failure_callback(self._executor_failed)
        self.max_pixels_in_flight = memory_budget.resolve_pixel_budget(
            max_pixels_in_flight, self._defaults, current_omni_platform.device_type
        )
        self._gate = memory_budget.PixelGate(self.max_pixels_in_flight)
        """Pixels handed to vllm-omni (waiting in its queue or running); the engine's loop."""
        self._loop = LoopThread("omni-engine-loop")
        logger.info(
            "vllm-omni engine ready: %s from %s (max_num_seqs=%d, request_batch_max_wait_ms=%g); "
            "defaults %s",
            config.model_class_name,
            config.model,
            config.max_num_seqs,
            config.request_batch_max_wait_ms,
            self._defaults,
        )

    @property
    def defaults(self) -> ModelDefaults:
        return self._defaults

    @property
    def diffusion_engine(self) -> DiffusionEngine:
        return self._engine

    def check_admission(self, num_images: int) -> None:
        self._refuse_if_closed()
        self.check_health()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise EngineNotReadyError("The vllm-omni engine is closed.")

    def check_health(self) -> None:
        if self._died is None and not self._closed:
            executor = self._engine.executor
            try:
                executor.check_health()
            except Exception as error:
                self._died = f"its worker died ({type(error).__name__}: {error})"
            if self._died is None and executor.is_dead:
                # vllm-omni shuts its executor down itself when its scheduling loop fails.
                self._died = "its executor was shut down"
        if self._died is not None:
            raise EngineDiedError(f"vllm-omni's diffusion engine is dead: {self._died}")
        if (hung := self._hang_watch.error()) is not None:
            raise hung

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Hand each image to vllm-omni at once (its scheduler batches) and stream its
        `ImagesStarted` as vllm-omni reports them, then the images."""
        self._refuse_if_closed()  # its loop is stopped: nothing would answer
        refuse_unsupported(
            request,
            self.model_class_name,
            takes_images=self.takes_images,
            takes_masks=self.takes_masks,
            takes_strength=self.takes_strength,
            defaults=self._defaults,
        )
        # vllm-omni keys its queue and output streams by id: a suffix of our own keeps two
        # requests apart even when a client sends the same X-Request-Id twice.
        base = f"{request.request_id or 'image'}-{uuid.uuid4().hex[:12]}"
        lora = await self._lora_request(request.loras)
        flight = Flight(request, base, lora, asyncio.get_running_loop())
        job = self._loop.submit(self._run(flight))
        flight.job = job
        self._in_flight.add(flight)
        job.add_done_callback(lambda _: self._finished(flight))
        try:
            async with contextlib.aclosing(flight.inbox.outputs()) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self._left(flight)

    async def add_lora(self, adapter: LoRAAdapter) -> None:
        """Check and copy the adapter (`OmniAdapters`), then have vllm-omni's workers load it;
        raise `LoRAAdapterError` if either fails."""
        if self._adapters is None:
            raise LoRAAdapterError.not_enabled(adapter.name)
        await self._adapters.add(adapter, self._load_in_workers)

    def unavailable_adapters(self) -> frozenset[int]:
        return frozenset() if self._adapters is None else self._adapters.unavailable

    async def _lora_request(self, stack: AdapterStack) -> ScaledLoRA | None:
        if self._adapters is not None:
            return await self._adapters.lora_for(stack, self._load_in_workers)
        if stack:
            raise EngineRequestError("LoRA is not enabled on this server.")
        return None

    def _load_in_workers(self, request: LoRARequest, replace: bool) -> Awaitable[None]:
        """`OmniAdapters.LoadInWorkers`: on the engine's loop."""
        return self._loop.submit(self._load_lora(request, replace))

    # On the caller's loop:

    def _started(self, flight: Flight) -> None:
        if flight.started_at is None:
            flight.started_at = time.monotonic()
            notify(self._observer.on_batch_start, flight.num_images)
        flight.started += 1
        flight.inbox.put(ImagesStarted(1, flight.num_images))

    def _finished(self, flight: Flight) -> None:
        """The job ended: its outcome goes to the stream, if it still listens."""
        self._in_flight.discard(flight)
        self._hang_watch.returned(flight)
        if flight.started_at is not None:
            notify(self._observer.on_batch_end, time.monotonic() - flight.started_at)
        flight.inbox.put(self._outcome(flight))

    def _outcome(self, flight: Flight) -> FinalImages | BaseException:
        """The images of a finished job, or the exception its stream raises."""
        job = flight.job
        assert job is not None
        if job.cancelled():  # the engine was closed under it
            return EngineClosedError()
        error = job.exception()
        if error is None:
            return FinalImages(job.result())
        if self._closed:
            closed = EngineClosedError()
            closed.__cause__ = error
            return closed
        if not isinstance(error, GenerationCancelled):
            logger.warning("Image request failed in the engine: %r", error)
        return error

    def _left(self, flight: Flight) -> None:
        """The stream ended: abort an unfinished job, and watch a started one (`HangWatch`)."""
        job = flight.job
        if job is None or job.done():
            return
        self._abort(flight)
        if flight.started:
            self._hang_watch.stopping(
                flight,
                lambda: not job.done(),
                f"the {flight.started} started image(s) of a request",
            )

    def _fail_waiting(self, error: BaseException) -> None:
        """Requests none of whose images started leave vllm-omni and fail with `error`."""
        for flight in self._in_flight:
            if flight.started == 0:
                self._abort(flight)
                flight.inbox.put(error)

    def _abort(self, flight: Flight) -> None:
        self._loop.call_soon(self._abort_on_loop, flight)

    async def close(self) -> None:
        """Fail the requests not started, let the started ones finish for at most
        `hang_grace_s`, then close vllm-omni's engine, which ends what is left."""
        if self._closed:
            return
        self._closed = True
        self._fail_waiting(EngineClosedError())
        # Only started requests are waited for: an aborted waiting one leaves vllm-omni's
        # queue without a word until its scheduler runs again, which it may never do.
        started = [flight.job for flight in self._in_flight if flight.started and flight.job]
        if started:
            _, left = await asyncio.wait(started, timeout=self._hang_watch.grace_s)
            if left:
                logger.error(
                    "Shutting down with %d request(s) still running in the image engine after "
                    "%g s; they are abandoned.",
                    len(left),
                    self._hang_watch.grace_s,
                )
        # Every job still in flight is cancelled once vllm-omni is closed: no caller waits on.
        await asyncio.to_thread(self._loop.stop, self._engine.close)
        if self._adapters is not None:
            self._adapters.remove()

    # On the engine's loop:

    def _abort_on_loop(self, flight: Flight) -> None:
        """Abort the flight's images in vllm-omni, and stop those not running there: not handed
        over yet (vllm-omni ignores an abort for an id it has not seen), between tries, or
        waiting in vllm-omni's queue (whose abort it reports only when it schedules again)."""
        if flight.aborted:
            return
        flight.aborted = True
        self._gate.withdraw(flight.request)  # held back by the pixel budget: wait no more
        self._engine.abort(flight.request_ids)
        for index, task in enumerate(flight.tasks):
            if index not in flight.running:
                task.cancel()

    async def _load_lora(self, request: LoRARequest, replace: bool) -> None:
        if replace:
            await self._engine.async_collective_rpc("remove_lora", args=(request.lora_int_id,))
        await self._engine.async_collective_rpc("add_lora", args=(request,))

    async def _run(self, flight: Flight) -> list[Image.Image]:
        """Every image of one API request, handed to vllm-omni once its pixels fit in the
        budget (`PixelGate`: first come first served; an abort ends the wait)."""
        async with self._gate.held(flight.request):
            return await self._run_images(flight)

    async def _run_images(self, flight: Flight) -> list[Image.Image]:
        """Every image of one API request; the first failure aborts the others."""
        flight.tasks = [
            asyncio.create_task(self._image(flight, i)) for i in range(flight.num_images)
        ]

        def abort_siblings(task: asyncio.Task[Image.Image]) -> None:
            if task.cancelled() or task.exception() is not None:
                self._abort_on_loop(flight)

        for task in flight.tasks:
            task.add_done_callback(abort_siblings)
        results = await asyncio.gather(*flight.tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # The cause, rather than the cancellations it brought on its siblings.
            raise next(
                (e for e in errors if not isinstance(e, _CANCELLATIONS)), GenerationCancelled()
            )
        return flight.request.keep_unmasked([r for r in results if isinstance(r, Image.Image)])

    async def _image(self, flight: Flight, index: int) -> Image.Image:
        """Image `index` of `flight`, tried again after a failure in a wave of several images
        (docs/architecture.md, "Faults"): out of memory, in half of that wave's images; failed
        otherwise (`may_be_one_requests`), with its request's images alone, once."""
        request = flight.request
        batch_key: tuple[str, str] | None = None
        failed_in: int | None = None  # the images of the last wave it ran out of memory in
        alone = False  # tried alone after a failure: a failure now is its own
        tries = 0
        while True:
            if flight.aborted:
                raise GenerationCancelled()  # aborted on its way here
            if tries:
                flight.request_ids[index] = f"{flight.base_id}-{index}-retry{tries}"
            tries += 1
            request_id = flight.request_ids[index]
            omni_request = to_omni_request(request, index, request_id, flight.lora, batch_key)
            outcome = TryOutcome.ENDED
            retry: asyncio.Future[tuple[str, str] | None] | None = None
            self._waves.watch(request_id)
            try:
                # From the check above to vllm-omni's admission there is no await: an abort on
                # this loop comes either before (caught above) or after (vllm-omni has it).
                return await self._try(flight, index, omni_request)
            except EngineError as error:
                failure, outcome = error, try_outcome(error)
                if outcome is TryOutcome.ENDED or (
                    outcome is TryOutcome.FAILED and (alone or self._closed)
                ):
                    raise
                retry = self._retries[request_id] = asyncio.get_running_loop().create_future()
            finally:
                wave = self._ended(flight, index, request_id, outcome, retry)
            try:
                batch_key = await retry  # once every image of its wave is in
            finally:
                self._retries.pop(request_id, None)
            if outcome is TryOutcome.FAILED:
                if batch_key is None:  # nothing else failed with it
                    raise failure
                alone = True
                continue
            size = 1 if wave is None else len(wave.request_ids)
            if batch_key is None:
                logger.warning(
                    "One %dx%d image of request %s ran out of device memory even alone; the "
                    "request fails: %s",
                    request.width,
                    request.height,
                    request.request_id or "(no id)",
                    failure,
                )
                message = f"one {request.width}x{request.height} image did not fit, even alone"
                raise EngineOutOfMemoryError(message) from failure
            if failed_in is not None and size >= failed_in:
                # Its half ran with other requests (a pipeline's pre-processing replaced the
                # batch key): stop, rather than retry in batches that do not shrink.
                raise EngineOutOfMemoryError(
                    f"out of memory again in a batch of {size} images, after a split"
                ) from failure
            failed_in = size

    def _ended(
        self,
        flight: Flight,
        index: int,
        request_id: str,
        outcome: TryOutcome,
        retry: asyncio.Future[tuple[str, str] | None] | None,
    ) -> ScheduledWave[Flight] | None:
        """A try ended: report it to the wave it ran in (`WaveLog.end`), which, once settled,
        hands each waiting `retry` its batch key (`_retry_wave`)."""
        flight.running.discard(index)
        wave = self._waves.end(request_id, outcome, flight)
        if wave is None and retry is not None:  # never scheduled by vllm-omni: none to retry
            retry.set_result(None)
        return wave

    def _wave_settled(self, wave: ScheduledWave[Flight]) -> None:  # on any thread
        self._loop.call_soon(self._retry_wave, wave)

    def _retry_wave(self, wave: ScheduledWave[Flight]) -> None:
        """Every image of a wave that failed is in: give each that waits its group's batch key
        (`None`: it is not tried again), group by group, so that they are handed to vllm-omni
        again in that order: halves of the out-of-memory ones, then each request alone."""
        halves, alone = retry_halves(wave), retry_alone(wave)
        caller = next(iter(wave.owners.values()))  # the metrics are told on a caller's loop
        if halves:
            logger.warning(
                "A vllm-omni batch of %d images ran out of device memory; retrying %s images.",
                len(wave.request_ids),
                " + ".join(str(len(half)) for half in halves),
            )
            caller.to_caller(notify, self._observer.on_batch_split, len(wave.request_ids))
        if alone:
            logger.warning(
                "A vllm-omni batch of %d images of %d requests failed; retrying each request "
                "alone.",
                len(wave.request_ids),
                len(alone),
            )
            caller.to_caller(notify, self._observer.on_batch_isolated, len(alone))
        keys = {request_id: retry_key(group) for group in halves + alone for request_id in group}
        for request_id in [*keys, *wave.out_of_memory, *wave.failed]:  # first group first
            retry = self._retries.get(request_id)
            if retry is not None and not retry.done():
                retry.set_result(keys.get(request_id))

    async def _try(self, flight: Flight, index: int, request: OmniDiffusionRequest) -> Image.Image:
        """One try of one image in vllm-omni: its image, or this project's exception."""
        from vllm_omni.diffusion.data import (
            DiffusionRequestAbortedError,
            is_diffusion_request_started_output,
        )

        image: Image.Image | None = None
        previews = 0
        try:
            async for outputs in self._engine.step_streaming(request):
                output = outputs[0]
                if is_diffusion_request_started_output(output):
                    flight.running.add(index)
                    if index not in flight.ever_started:
                        flight.ever_started.add(index)
                        flight.to_caller(self._started, flight)
                    continue
                images = output.images
                if len(images) != 1 or not isinstance(images[0], Image.Image):
                    raise EngineError(f"vllm-omni returned {images!r} for one image")
                if not output.finished:  # a chunk of its streaming output: a preview
                    flight.to_caller(flight.add_preview, previews, index, images[0])
                    previews += 1
                    continue
                image = images[0]
        except DiffusionRequestAbortedError as error:
            raise GenerationCancelled() from error
        except (EngineError, GenerationCancelled):
            raise
        except Exception as error:
            raise classify_failure(error, self.check_health) from error
        if image is None:
            raise EngineError("vllm-omni finished the request without an image")
        return image

    def _executor_failed(self) -> None:  # called by vllm-omni's worker monitor
        self._died = self._died or "its executor reported that its worker died"
        logger.error("vllm-omni's diffusion executor died; /health now answers 503.")
