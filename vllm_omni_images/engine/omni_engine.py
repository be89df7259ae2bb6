"""An engine over vllm-omni's `DiffusionEngine`: its pipelines, batching, parallelism and caches.

vllm-omni is imported only when this module's `OmniEngine` is built (a cold import takes
~20 s), so serving with the diffusers engine never pays for it.

How a request maps onto vllm-omni (`to_omni_requests`):

1. Each image becomes one vllm-omni request with its own seed. vllm-omni draws all
   `num_outputs_per_prompt` images of a request from one generator, which would make image `i`
   depend on the images before it; one request per image keeps this project's contract that
   an image depends only on its seed, alone or batched. vllm-omni's scheduler batches the
   images again (`max_num_seqs`), so nothing is lost.
2. The seed becomes a CPU generator in vllm-omni's worker (`generator_device="cpu"`), as in the
   diffusers engine, so a seed gives the same noise on any device.
3. Prompt and negative prompt go in an `OmniTextPrompt`; size, steps and guidance in
   `OmniDiffusionSamplingParams`, which also asks for the "started" event
   (`emit_request_lifecycle`) that becomes the request's `ImagesStarted`: admission counts
   an image as queued until then.
4. A LoRA adapter goes as vllm-omni's own `LoRARequest` and `lora_scale` in the sampling
   params; its scheduler keeps adapters and strengths in separate batches. Adapters are
   loaded when they are added (`add_lora`, vllm-omni's worker RPC), from a PEFT copy that
   `lora_files.py` writes (vllm-omni reads only PEFT's format, with its own module names).

vllm-omni's engine binds to the first event loop that drives it, and its post-processing
(tensors to PIL images) runs on that loop; it gets a loop thread of its own, so it neither
blocks the server's loop nor cares which loop submits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from vllm_omni_images.engine.base import (
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
from vllm_omni_images.engine.lora_files import (
    check_fits,
    check_rank,
    meta_transformer,
    read_adapter,
    write_peft_folder,
)
from vllm_omni_images.engine.model_folder import defaults_for_pipeline_class

if TYPE_CHECKING:
    from vllm_omni.diffusion.data import OmniDiffusionConfig
    from vllm_omni.diffusion.diffusion_engine import DiffusionEngine
    from vllm_omni.diffusion.request import OmniDiffusionRequest
    from vllm_omni.lora.request import LoRARequest

logger = logging.getLogger(__name__)


def build_omni_config(
    model_path: str,
    options: Mapping[str, Any],
    *,
    max_batch_size: int = 1,
    batch_delay_ms: float = 0.0,
    lora: LoRASettings | None = None,
) -> OmniDiffusionConfig:
    """vllm-omni's engine config for `model_path`, as its own `vllm serve --omni` would build
    it: `options` are its config fields by their vllm-omni names (see
    `server/cli_args.OMNI_FLAGS`; `distributed_executor_backend` picks its executor: `mp`,
    `uni`, or a `DiffusionExecutor` class or its path); batching comes from this project's
    batching flags, and vllm-omni's adapter cache from `--max-cpu-loras`."""
    from vllm_omni.diffusion.data import DiffusionParallelConfig, OmniDiffusionConfig
    from vllm_omni.diffusion.diffusion_engine import supports_request_batch
    from vllm_omni.platforms import current_omni_platform

    if current_omni_platform.device_type == "cpu" and "dtype" not in options:
        # vllm-omni's default, bfloat16, meets vLLM's CPU matmul with float32 inputs; the
        # diffusers engine runs float32 on the CPU too, so the two engines agree.
        options = {**options, "dtype": torch.float32}
    if lora is not None:
        options = {**options, "max_cpu_loras": lora.cpu_slots}
    # Sizes go to the parallel config (which picks its own fields), the rest to the top level.
    parallel = DiffusionParallelConfig.from_stage_overrides(options)
    parallel_fields = {f.name for f in fields(DiffusionParallelConfig)}
    config = OmniDiffusionConfig.from_kwargs(
        model=model_path,
        parallel_config=parallel,
        num_gpus=parallel.world_size,
        max_num_seqs=max_batch_size,
        request_batch_max_wait_ms=batch_delay_ms,
        **{name: value for name, value in options.items() if name not in parallel_fields},
    )
    config.enrich_config()  # reads model_index.json: the pipeline class, its transformer config
    if max_batch_size > 1 and not supports_request_batch(config):
        logger.info(
            "%s runs one image at a time in vllm-omni (it declares no request batching); "
            "--image-max-batch-size %d does not apply.",
            config.model_class_name,
            max_batch_size,
        )
        config.max_num_seqs = 1
    return config


def to_omni_requests(
    request: EngineRequest, request_ids: Sequence[str], lora: LoRARequest | None = None
) -> list[OmniDiffusionRequest]:
    """One `OmniDiffusionRequest` per image of `request` (see the module docstring); `lora` is
    vllm-omni's request for `request.lora`."""
    from vllm_omni.diffusion.request import OmniDiffusionRequest
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams, OmniTextPrompt

    prompt = OmniTextPrompt(prompt=request.prompt)
    if request.negative_prompt is not None:
        prompt["negative_prompt"] = request.negative_prompt
    sampling: dict[str, Any] = {
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.num_inference_steps,
        "num_outputs_per_prompt": 1,
        "generator_device": "cpu",
        "emit_request_lifecycle": True,
    }
    if request.image is not None:  # an edit, for pipelines that take an input image
        prompt["multi_modal_data"] = {"image": request.image}
    if request.strength is not None:
        sampling["strength"] = request.strength
    if request.true_cfg_scale is not None:
        sampling["true_cfg_scale"] = request.true_cfg_scale
    if request.guidance_scale is not None:
        sampling["guidance_scale"] = request.guidance_scale
    if lora is not None:
        sampling["lora_request"] = lora
        sampling["lora_scale"] = request.lora_scale
    return [
        OmniDiffusionRequest(
            prompt=dict(prompt),  # one each: vllm-omni's pre-processing may write to it
            sampling_params=OmniDiffusionSamplingParams(seed=seed, **sampling),
            request_id=request_id,
        )
        for seed, request_id in zip(request.seeds, request_ids, strict=True)
    ]


@dataclass(eq=False)
class _InFlight:
    """One request handed to vllm-omni: its images' ids there, and what its stream receives
    (a count of images that started, the outcome, or an exception that ends it)."""

    request_ids: list[str]
    inbox: asyncio.Queue[int | asyncio.Future[list[Image.Image]] | BaseException]
    started: int = 0


class OmniEngine(ImageEngine):
    """Serves a model through vllm-omni's `DiffusionEngine` (see the module docstring)."""

    def __init__(
        self,
        config: OmniDiffusionConfig,
        defaults: ModelDefaults | None = None,
        *,
        hang_grace_s: float | None = 60.0,
        observer: EngineObserver | None = None,
        lora: LoRASettings | None = None,
    ) -> None:
        """Start vllm-omni's engine for `config` (loads the pipeline and runs its warm-up).
        A started request that has not left vllm-omni `hang_grace_s` after it was aborted
        marks the engine hung (`hang_watch.py`) until it leaves. With `lora` (and `config`
        built with it) it serves LoRA adapters."""
        from vllm_omni.diffusion.diffusion_engine import DiffusionEngine
        from vllm_omni.diffusion.io_support import supports_multimodal_input

        assert config.model is not None
        # vllm-omni's `mp` executor makes its events in the default context and then starts
        # its workers with spawn, which only works when spawn is already the default; its own
        # stage set-up makes it so before building an engine (`stage_init_utils`), as here.
        multiprocessing.set_start_method("spawn", force=True)
        self.model_class_name = config.model_class_name
        self.takes_images = supports_multimodal_input(config)[0]
        """Whether the pipeline edits an input image (e.g. Qwen-Image-Edit)."""
        self._defaults = defaults or defaults_for_pipeline_class(
            config.model_class_name, config.model
        )
        self._observer = observer or NoObserver()
        self._hang_watch = HangWatch(hang_grace_s, self._fail_waiting, observer=self._observer)
        self._died: str | None = None
        # Ids handed over and not finished (added by `generate`), and those of them aborted:
        # read and written on the engine's loop.
        self._live: set[str] = set()
        self._aborted: set[str] = set()
        self._in_flight: dict[asyncio.Future[list[Image.Image]], _InFlight] = {}
        self._closed = False
        self._model_path = config.model
        self._lora = lora
        self._adapters: dict[int, LoRARequest] = {}
        self._adapter_dir: Path | None = None
        self._engine: DiffusionEngine = DiffusionEngine.make_engine(config)
        self._engine.executor.register_failure_callback(self._executor_failed)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="omni-engine-loop", daemon=True
        )
        self._loop_thread.start()
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
        if self._closed:
            raise EngineNotReadyError("The vllm-omni engine is closed.")
        self.check_health()

    def check_health(self) -> None:
        if self._died is None and not self._closed:
            try:
                self._engine.executor.check_health()
            except Exception as error:
                self._died = f"its worker died ({type(error).__name__}: {error})"
            # vllm-omni closes its engine itself when its scheduling loop fails; it exposes
            # no public flag for that.
            if self._died is None and getattr(self._engine, "_closed", False):
                self._died = "its scheduling loop stopped"
        if self._died is not None:
            raise EngineDiedError(f"vllm-omni's diffusion engine is dead: {self._died}")
        if (hung := self._hang_watch.error()) is not None:
            raise hung

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Hands each image to vllm-omni at once (its scheduler batches them) and streams the
        request's `ImagesStarted` as vllm-omni reports them, then its images."""
        self.check_admission(request.num_images)
        self._refuse_what_vllm_omni_cannot_do(request)
        # vllm-omni keys its queue and output streams by id: a suffix of our own keeps two
        # requests apart even when a client sends the same X-Request-Id twice.
        base = f"{request.request_id or 'image'}-{uuid.uuid4().hex[:12]}"
        flight = _InFlight([f"{base}-{i}" for i in range(request.num_images)], asyncio.Queue())
        loop = asyncio.get_running_loop()

        def on_started(images: int) -> None:  # the engine's loop
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                loop.call_soon_threadsafe(flight.inbox.put_nowait, images)

        lora = self._lora_request(request.lora)
        run = self._run(to_omni_requests(request, flight.request_ids, lora), on_started)
        self._live.update(flight.request_ids)  # before the loop can see an abort for them
        job = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run, self._loop))
        self._in_flight[job] = flight
        job.add_done_callback(flight.inbox.put_nowait)
        started_at: float | None = None
        try:
            while True:
                message = await flight.inbox.get()
                if isinstance(message, BaseException):
                    raise message
                if isinstance(message, int):
                    if started_at is None:
                        started_at = time.monotonic()
                        notify(self._observer.on_batch_start, request.num_images)
                    flight.started += message
                    yield ImagesStarted(message, request.num_images)
                    continue
                yield FinalImages(self._outcome(message))
                return
        finally:
            self._left(job, flight, started_at)

    async def add_lora(self, adapter: LoRAAdapter) -> None:
        """Check the adapter against the model's transformer (built on the meta device from
        its config: the weights are in vllm-omni's worker), write vllm-omni's PEFT copy, and
        have the worker load it."""
        from vllm_omni.lora.request import LoRARequest

        if self._lora is None:
            raise LoRAAdapterError.not_enabled(adapter.name)
        limit = self._lora.max_lora_rank
        folder = await asyncio.to_thread(self._peft_copy, adapter, limit)
        request = LoRARequest(
            lora_name=adapter.name, lora_int_id=adapter.adapter_id, lora_path=str(folder)
        )

        def load() -> None:
            if adapter.adapter_id in self._adapters:  # loaded again in place
                self._engine.collective_rpc("remove_lora", args=(adapter.adapter_id,))
            self._engine.collective_rpc("add_lora", args=(request,))

        try:
            await asyncio.to_thread(load)
        except Exception as error:
            raise LoRAAdapterError(
                f"{LoRAAdapterError.prefix(adapter.name)} ({adapter.path}) cannot be served: "
                f"vllm-omni could not load it ({error})."
            ) from error
        self._adapters[adapter.adapter_id] = request

    def _peft_copy(self, adapter: LoRAAdapter, max_rank: int) -> Path:
        weights = read_adapter(adapter.path, adapter.name)
        check_rank(weights, max_rank, adapter.name, adapter.path)
        assert self._model_path is not None
        check_fits(weights, meta_transformer(self._model_path), adapter.name, adapter.path)
        if self._adapter_dir is None:
            self._adapter_dir = Path(tempfile.mkdtemp(prefix="vllm-omni-images-lora-"))
        # A new folder per load: vllm-omni may re-read an evicted adapter from its path.
        folder = self._adapter_dir / f"{adapter.adapter_id}-{uuid.uuid4().hex[:8]}"
        write_peft_folder(weights, folder)
        return folder

    def _lora_request(self, adapter: LoRAAdapter | None) -> LoRARequest | None:
        if adapter is None:
            return None
        lora = self._adapters.get(adapter.adapter_id)
        if lora is None:
            raise EngineRequestError(f"LoRA adapter '{adapter.name}' was never loaded.")
        return lora

    def _refuse_what_vllm_omni_cannot_do(self, request: EngineRequest) -> None:
        if request.image is not None and not self.takes_images:
            raise EngineRequestError(
                f"{self.model_class_name} takes no input image in vllm-omni, so this server "
                "cannot edit with it; serve an edit model (e.g. Qwen-Image-Edit), or this "
                "model with --image-engine diffusers (image-to-image)."
            )
        if request.mask is not None:
            raise EngineRequestError(
                "Masks are not supported by the vllm-omni engine in this version; edit "
                "without a mask, or serve with --image-engine diffusers (inpainting)."
            )

    def _outcome(self, job: asyncio.Future[list[Image.Image]]) -> list[Image.Image]:
        """The images of a finished job, or the exception its stream raises."""
        if job.cancelled():  # the engine was closed under it
            raise EngineClosedError()
        error = job.exception()
        if error is None:
            return job.result()
        if self._closed:
            raise EngineClosedError() from error
        if not isinstance(error, GenerationCancelled):
            logger.warning("Image request failed in the engine: %r", error)
        raise error

    def _left(
        self,
        job: asyncio.Future[list[Image.Image]],
        flight: _InFlight,
        started_at: float | None,
    ) -> None:
        """The stream ended. An unfinished job is aborted; if it had started and has not left
        vllm-omni `hang_grace_s` later, the engine is stuck (step mode stops a request at its
        next step; otherwise it leaves when its batch returns)."""

        def finished(_: object) -> None:
            if not job.cancelled():
                job.exception()  # seen: a stream that left early does not read it
            self._in_flight.pop(job, None)
            self._hang_watch.returned(job)
            if started_at is not None:
                notify(self._observer.on_batch_end, time.monotonic() - started_at)

        if not job.done():
            self.abort(flight.request_ids)
            if flight.started:
                self._hang_watch.stopping(
                    job,
                    lambda: not job.done(),
                    f"the {flight.started} started image(s) of a request",
                )
        job.add_done_callback(finished)

    def _fail_waiting(self, error: BaseException) -> None:
        """Requests none of whose images started leave vllm-omni and fail with `error`."""
        for flight in self._in_flight.values():
            if flight.started == 0:
                self.abort(flight.request_ids)
                flight.inbox.put_nowait(error)

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort now in vllm-omni (it is thread-safe), and again on the engine's loop, where
        requests are handed to vllm-omni: vllm-omni ignores an abort for an id it has not seen
        yet, so one aborted on its way there is stopped at the door instead."""
        ids = list(request_ids)
        self._engine.abort(ids)
        with contextlib.suppress(RuntimeError):  # the loop is closed: so is the engine
            self._loop.call_soon_threadsafe(self._abort_on_loop, ids)

    def _abort_on_loop(self, request_ids: list[str]) -> None:
        self._aborted.update(rid for rid in request_ids if rid in self._live)
        self._engine.abort(request_ids)

    async def close(self) -> None:
        """Refuse new work and fail the requests that have not started; let the started ones
        finish for at most `hang_grace_s` (a stuck worker may never finish them); then close
        vllm-omni's engine, which ends what is left, and free the model."""
        if self._closed:
            return
        self._closed = True
        self._fail_waiting(EngineClosedError())
        # Only started requests are waited for: an aborted waiting one leaves vllm-omni's
        # queue without a word until its scheduler runs again, which it may never do.
        started = [job for job, flight in self._in_flight.items() if flight.started]
        if started:
            _, left = await asyncio.wait(started, timeout=self._hang_watch.grace_s)
            if left:
                logger.error(
                    "Shutting down with %d request(s) still running in the image engine after "
                    "%g s; they are abandoned.",
                    len(left),
                    self._hang_watch.grace_s,
                )
        await asyncio.to_thread(self._close_vllm_omni)
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)

    def _close_vllm_omni(self) -> None:
        """Close vllm-omni's engine, then end every request still in flight (each job is
        cancelled) before the engine's loop stops, so no caller waits forever."""
        self._engine.close()
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)

    # On the engine's own loop:

    async def _run(
        self, omni_requests: list[OmniDiffusionRequest], on_started: Callable[[int], None]
    ) -> list[Image.Image]:
        """Every image of one API request; the first failure aborts the others."""
        request_ids = [r.request_id for r in omni_requests]
        tasks = [asyncio.create_task(self._image(r, on_started)) for r in omni_requests]

        def abort_siblings(task: asyncio.Task[Image.Image]) -> None:
            if task.cancelled() or task.exception() is not None:
                self._abort_on_loop(request_ids)

        for task in tasks:
            task.add_done_callback(abort_siblings)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # The cause, rather than the cancellations it brought on its siblings.
            raise next((e for e in errors if not isinstance(e, GenerationCancelled)), errors[0])
        return [r for r in results if isinstance(r, Image.Image)]

    async def _image(
        self, request: OmniDiffusionRequest, on_started: Callable[[int], None]
    ) -> Image.Image:
        from vllm_omni.diffusion.data import (
            DiffusionRequestAbortedError,
            is_diffusion_request_started_output,
        )

        image: Image.Image | None = None
        try:
            if request.request_id in self._aborted:
                raise GenerationCancelled()  # aborted on its way here
            # From the check above to vllm-omni's admission there is no await: an abort on
            # this loop comes either before (caught above) or after (vllm-omni has it).
            async for outputs in self._engine.step_streaming(request):
                output = outputs[0]
                if is_diffusion_request_started_output(output):
                    on_started(1)
                    continue
                images = output.images
                if len(images) != 1 or not isinstance(images[0], Image.Image):
                    raise EngineError(f"vllm-omni returned {images!r} for one image")
                image = images[0]
        except DiffusionRequestAbortedError as error:
            raise GenerationCancelled() from error
        except (EngineError, GenerationCancelled):
            raise
        except Exception as error:
            raise self._classify(error) from error
        finally:
            self._live.discard(request.request_id)
            self._aborted.discard(request.request_id)
        if image is None:
            raise EngineError("vllm-omni finished the request without an image")
        return image

    def _classify(self, error: Exception) -> EngineError:
        """This project's exception for a failure vllm-omni reported. vllm-omni passes a
        worker's exception on as its message only, so out of memory is told by its text."""
        from vllm_omni.errors import OmniClientError

        message = str(error) or type(error).__name__
        if isinstance(error, OmniClientError):
            return EngineRequestError(message)
        try:
            self.check_health()
        except EngineDiedError as died:
            return died
        if "out of memory" in message.lower():
            return EngineOutOfMemoryError(message)
        return EngineError(message)

    def _executor_failed(self) -> None:  # called by vllm-omni's worker monitor
        self._died = self._died or "its executor reported that its worker died"
        logger.error("vllm-omni's diffusion executor died; /health now answers 503.")


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
