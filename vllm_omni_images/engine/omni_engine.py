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
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    LoRASettings,
    ModelDefaults,
    NoObserver,
    PreviewImages,
    notify,
)
from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineError,
    EngineNotReadyError,
    EngineRequestError,
    GenerationCancelled,
    LoRAAdapterError,
)
from vllm_omni_images.engine.hang_watch import HangWatch
from vllm_omni_images.engine.loop_thread import LoopThread
from vllm_omni_images.engine.lora_files import PeftCopies
from vllm_omni_images.engine.model_folder import defaults_for_pipeline_class
from vllm_omni_images.engine.omni_requests import (
    classify_failure,
    refuse_unsupported,
    to_omni_requests,
)

if TYPE_CHECKING:
    from vllm_omni.diffusion.data import OmniDiffusionConfig
    from vllm_omni.diffusion.diffusion_engine import DiffusionEngine
    from vllm_omni.diffusion.request import OmniDiffusionRequest
    from vllm_omni.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Flight:
    """One request handed to vllm-omni, as its images' ids there."""

    request_ids: list[str]
    caller: asyncio.AbstractEventLoop
    """The loop of `generate`'s caller, which the fields below belong to."""
    # The caller's loop only:
    inbox: Inbox = field(default_factory=Inbox)
    job: asyncio.Future[list[Image.Image]] | None = None
    started: int = 0
    """Images that left vllm-omni's queue."""
    started_at: float | None = None
    previews: dict[int, dict[int, Image.Image]] = field(default_factory=dict)
    """Preview index -> its images in so far, by position (streaming output only)."""
    # The engine's loop only:
    aborted: bool = False
    """Images not yet handed to vllm-omni are not handed any more."""

    @property
    def num_images(self) -> int:
        return len(self.request_ids)


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
    ) -> None:
        """Start vllm-omni's engine for `config` (loads the pipeline, runs its warm-up). With
        `lora` (and `config` built with it) it serves LoRA adapters."""
        from vllm_omni.diffusion.diffusion_engine import DiffusionEngine
        from vllm_omni.diffusion.io_support import supports_multimodal_input

        assert config.model is not None
        # vllm-omni's `mp` executor needs spawn as the default, as its own stage set-up makes it.
        multiprocessing.set_start_method("spawn", force=True)
        self.model_class_name = config.model_class_name
        self.takes_images = supports_multimodal_input(config)[0]
        """Whether the pipeline edits an input image (e.g. Qwen-Image-Edit)."""
        self._defaults = dataclasses.replace(
            defaults or defaults_for_pipeline_class(config.model_class_name, config.model),
            supports_partial_images=config.streaming_output,  # pipelines/step_previews.py
        )
        self._observer = observer or NoObserver()
        self._hang_watch = HangWatch(hang_grace_s, self._fail_waiting, observer=self._observer)
        self._died: str | None = None
        self._in_flight: set[_Flight] = set()
        self._closed = False
        self._lora = lora
        self._peft = None if lora is None else PeftCopies(config.model, lora.max_lora_rank)
        self._adapters: dict[int, LoRARequest] = {}
        self._engine: DiffusionEngine = DiffusionEngine.make_engine(config)
        self._engine.executor.register_failure_callback(self._executor_failed)
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
        refuse_unsupported(request, self.model_class_name, self.takes_images, self._defaults)
        # vllm-omni keys its queue and output streams by id: a suffix of our own keeps two
        # requests apart even when a client sends the same X-Request-Id twice.
        base = f"{request.request_id or 'image'}-{uuid.uuid4().hex[:12]}"
        loop = asyncio.get_running_loop()
        flight = _Flight([f"{base}-{i}" for i in range(request.num_images)], loop)
        omni_requests = to_omni_requests(
            request, flight.request_ids, self._lora_request(request.lora)
        )

        def on_started() -> None:  # the engine's loop
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                loop.call_soon_threadsafe(self._started, flight)

        job = self._loop.submit(self._run(flight, omni_requests, on_started))
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
        """Check and copy the adapter (`PeftCopies`), then have vllm-omni's workers load it;
        raise `LoRAAdapterError` if either fails."""
        from vllm_omni.lora.request import LoRARequest

        if self._peft is None:
            raise LoRAAdapterError.not_enabled(adapter.name)
        folder = await asyncio.to_thread(self._peft.write, adapter)
        request = LoRARequest(
            lora_name=adapter.name, lora_int_id=adapter.adapter_id, lora_path=str(folder)
        )
        replace = adapter.adapter_id in self._adapters  # loaded again in place
        try:
            await self._loop.submit(self._load_lora(request, replace))
        except Exception as error:
            raise LoRAAdapterError(
                f"{LoRAAdapterError.prefix(adapter.name)} ({adapter.path}) cannot be served: "
                f"vllm-omni could not load it ({error})."
            ) from error
        self._adapters[adapter.adapter_id] = request

    def _lora_request(self, adapter: LoRAAdapter | None) -> LoRARequest | None:
        if adapter is None:
            return None
        lora = self._adapters.get(adapter.adapter_id)
        if lora is None:
            raise EngineRequestError(f"LoRA adapter '{adapter.name}' was never loaded.")
        return lora

    # On the caller's loop:

    def _started(self, flight: _Flight) -> None:
        if flight.started_at is None:
            flight.started_at = time.monotonic()
            notify(self._observer.on_batch_start, flight.num_images)
        flight.started += 1
        flight.inbox.put(ImagesStarted(1, flight.num_images))

    def _preview(self, flight: _Flight, index: int, position: int, image: Image.Image) -> None:
        """Preview `index` of image `position`; once every image has it, it goes out."""
        images = flight.previews.setdefault(index, {})
        images[position] = image
        if len(images) == flight.num_images:
            del flight.previews[index]
            flight.inbox.put(PreviewImages(index, [images[i] for i in range(flight.num_images)]))

    def _finished(self, flight: _Flight) -> None:
        """The job ended: its outcome goes to the stream, if it still listens."""
        self._in_flight.discard(flight)
        self._hang_watch.returned(flight)
        if flight.started_at is not None:
            notify(self._observer.on_batch_end, time.monotonic() - flight.started_at)
        flight.inbox.put(self._outcome(flight))

    def _outcome(self, flight: _Flight) -> FinalImages | BaseException:
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

    def _left(self, flight: _Flight) -> None:
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

    def _abort(self, flight: _Flight) -> None:
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
        if self._peft is not None:
            self._peft.remove()

    # On the engine's loop:

    def _abort_on_loop(self, flight: _Flight) -> None:
        """Abort the flight's images in vllm-omni, and mark it so that those not handed over
        yet are not (vllm-omni ignores an abort for an id it has not seen)."""
        flight.aborted = True
        self._engine.abort(flight.request_ids)

    async def _load_lora(self, request: LoRARequest, replace: bool) -> None:
        if replace:
            await self._engine.async_collective_rpc("remove_lora", args=(request.lora_int_id,))
        await self._engine.async_collective_rpc("add_lora", args=(request,))

    async def _run(
        self,
        flight: _Flight,
        omni_requests: list[OmniDiffusionRequest],
        on_started: Callable[[], None],
    ) -> list[Image.Image]:
        """Every image of one API request; the first failure aborts the others."""
        tasks = [asyncio.create_task(self._image(flight, r, on_started)) for r in omni_requests]

        def abort_siblings(task: asyncio.Task[Image.Image]) -> None:
            if task.cancelled() or task.exception() is not None:
                self._abort_on_loop(flight)

        for task in tasks:
            task.add_done_callback(abort_siblings)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # The cause, rather than the cancellations it brought on its siblings.
            raise next((e for e in errors if not isinstance(e, GenerationCancelled)), errors[0])
        return [r for r in results if isinstance(r, Image.Image)]

    async def _image(
        self, flight: _Flight, request: OmniDiffusionRequest, on_started: Callable[[], None]
    ) -> Image.Image:
        from vllm_omni.diffusion.data import (
            DiffusionRequestAbortedError,
            is_diffusion_request_started_output,
        )

        image: Image.Image | None = None
        previews = 0
        try:
            if flight.aborted:
                raise GenerationCancelled()  # aborted on its way here
            # From the check above to vllm-omni's admission there is no await: an abort on
            # this loop comes either before (caught above) or after (vllm-omni has it).
            async for outputs in self._engine.step_streaming(request):
                output = outputs[0]
                if is_diffusion_request_started_output(output):
                    on_started()
                    continue
                images = output.images
                if len(images) != 1 or not isinstance(images[0], Image.Image):
                    raise EngineError(f"vllm-omni returned {images!r} for one image")
                if not output.finished:  # a chunk of its streaming output: a preview
                    position = flight.request_ids.index(request.request_id)
                    with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                        flight.caller.call_soon_threadsafe(
                            self._preview, flight, previews, position, images[0]
                        )
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
