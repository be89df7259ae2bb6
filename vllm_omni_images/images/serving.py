"""`OpenAIServingImage`: an Images API request to engine work and back; like vLLM's
`OpenAIServing*` it returns the response model or vLLM's `ErrorResponse` (from the error table)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TypeVar

from fastapi import Request
from PIL import Image
from vllm import envs
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.utils import random_uuid

from vllm_omni_images.engine.base import (
    NO_ADAPTER_DEFAULTS,
    AdapterDefaults,
    EngineRequest,
    FinalImages,
    LoRAAdapter,
    PreviewImages,
)
from vllm_omni_images.engine.client import ImageEngineClient, RequestTimings
from vllm_omni_images.engine.cpu_priority import yield_cpu_to_serving
from vllm_omni_images.images.edits import ImageInputs, RemoteImageFetcher
from vllm_omni_images.images.encoding import encode_image, encode_image_base64
from vllm_omni_images.images.errors import (
    AdapterNotFoundError,
    ModelNotFoundError,
    error_kind,
    error_response,
)
from vllm_omni_images.images.file_store import ImageStore
from vllm_omni_images.images.limits import DEFAULT_LIMITS, ImageLimits
from vllm_omni_images.images.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ImageObject,
    ImageUsage,
)
from vllm_omni_images.images.request_mapping import MappingContext, to_engine_request
from vllm_omni_images.images.request_metrics import Outcome, RequestMetrics
from vllm_omni_images.images.response_formats import (
    DefaultResponseFormat,
    ResponseFormat,
    default_response_format,
)
from vllm_omni_images.images.safe_text import printable
from vllm_omni_images.images.streaming import (
    completed_event,
    partial_image_event,
    server_sent_event,
)
from vllm_omni_images.images.usage import image_usage

logger = init_logger(__name__)

_Encoded = TypeVar("_Encoded", str, bytes)

IMAGE_FILE_ROUTE = "image_file"
IMAGE_FILES_PATH = "/images/files"
"""The name of the route that serves stored images (`api_router.image_file`)."""

MAX_LOGGED_ID_CHARS = 128
"""A client's `X-Request-Id` (the request's id) or `user` is logged cut to this, escaped."""


@dataclass
class _RequestRecord:
    """What the per-request log line and the metrics need to know."""

    request_id: str
    user: str | None
    engine_request: EngineRequest | None = None
    timings: RequestTimings = field(default_factory=RequestTimings)
    encode_s: float | None = None
    images: int = 0


class OpenAIServingImage:
    def __init__(
        self,
        engine_client: ImageEngineClient,
        models: OpenAIServingModels,
        *,
        log_error_stack: bool = False,
        encode_executor: Executor | None = None,
        image_store: ImageStore | None = None,
        image_url_base: str | None = None,
        default_response_format: DefaultResponseFormat = "auto",
        fetch_remote_image: RemoteImageFetcher | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
        request_metrics: RequestMetrics | None = None,
        seed: int | None = None,
        adapter_defaults: Mapping[str, AdapterDefaults] | None = None,
    ) -> None:
        self.engine_client = engine_client
        self.models = models
        # Kept as given, even empty: the served models fill and change it in place.
        self.adapter_defaults: Mapping[str, AdapterDefaults] = (
            adapter_defaults if adapter_defaults is not None else {}
        )
        """Each adapter's defaults by name, as the served models keep them (read per request:
        a runtime load may change them)."""
        self.seed_source = random.Random(seed) if seed is not None else None
        """The draw of seeds for seedless requests (`--seed`); `None`: the OS."""
        self.request_metrics = request_metrics
        self.limits = limits
        self.image_store = image_store
        """Where `response_format: "url"` images go; without one, `url` is refused (400)."""
        self.image_url_base = image_url_base
        """`--image-url-base`; `None`: the address the request came to."""
        self.default_response_format: DefaultResponseFormat = default_response_format
        """`--image-default-response-format`: for a request that names none."""
        self.fetch_remote_image = fetch_remote_image
        """How edits fetch http(s) image URLs; `None` (no host allowed): a 400."""
        self.log_error_stack = log_error_stack
        # Encoding is CPU work in C code that releases the GIL: a few threads encode one
        # request's images in parallel without touching the event loop. Like denoising it is
        # bulk work, so it too yields the CPU to the event loop.
        self._encode_executor = encode_executor or ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1),
            thread_name_prefix="image-encode",
            initializer=yield_cpu_to_serving,
        )

    @staticmethod
    def _request_id(raw_request: Request | None) -> str:
        header = raw_request.headers.get("X-Request-Id") if raw_request is not None else None
        if header and header.strip():
            return printable(header.strip(), MAX_LOGGED_ID_CHARS)
        return f"img-{random_uuid()}"

    async def create_image(
        self,
        request: ImageGenerationRequest,
        raw_request: Request | None = None,
        inputs: ImageInputs | None = None,
    ) -> ImageGenerationResponse | ErrorResponse | AsyncGenerator[str, None]:
        """Generate, or edit or vary `inputs`; with `stream`, an iterator of server-sent events
        that settles the request's log and metrics when it ends."""
        user = request.user or request.safety_identifier
        record = _RequestRecord(
            self._request_id(raw_request),
            printable(user, MAX_LOGGED_ID_CHARS) if user is not None else None,
        )
        outcome: Outcome = "cancelled"  # unless the handler gets to say otherwise
        streams = False
        try:
            outcome, result = await self._create_image(request, record, raw_request, inputs)
            streams = not isinstance(result, (ImageGenerationResponse, ErrorResponse))
            return result
        except Exception:
            outcome = "error"
            raise
        finally:
            if not streams:
                self._finish(record, outcome)

    async def _create_image(
        self,
        request: ImageGenerationRequest,
        record: _RequestRecord,
        raw_request: Request | None,
        inputs: ImageInputs | None,
    ) -> tuple[Outcome, ImageGenerationResponse | ErrorResponse | AsyncGenerator[str, None]]:
        try:
            lora = await self._adapter_named(request.model)
            listed = await self._listed_adapters(request)
            response_format = self._response_format(request, raw_request)
            context = MappingContext(
                record.request_id,
                self.engine_client.defaults,
                self.limits,
                lora,
                listed,
                self.seed_source,
            )
            engine_request = to_engine_request(request, context, inputs)
            record.engine_request = engine_request
            # Counted now, from the engine's tokenizer: once the images come, a shutdown may
            # have closed the engine client (the request is answered all the same).
            usage = self._usage(engine_request)
            if request.stream:
                # Overload and shutdown answers keep their status (429, 503) as plain JSON:
                # asked before the first event, as vLLM asks before it streams.
                self.engine_client.check_admission(engine_request)
                return "ok", self._stream(request, engine_request, usage, record)
            images = await self._generate(engine_request, record)
            data = await self._deliver(images, request, response_format, record, raw_request)
        except Exception as exc:
            return self._failed(record, exc)
        return "ok", ImageGenerationResponse(
            data=data,
            size=f"{engine_request.width}x{engine_request.height}",
            output_format=request.output_format,
            quality=request.quality or "auto",
            usage=usage,
        )

    async def _adapter_named(self, model: str | None) -> LoRAAdapter | None:
        """The LoRA adapter `model` names, `None` for the base model (or no name), resolved as
        vLLM's serving does; raises `ModelNotFoundError` (404) for a name that is neither."""
        if not model or self.models.is_base_model(model):
            return None
        found: LoRARequest | ErrorResponse | None = self.models.lora_requests.get(model)
        if found is None and envs.VLLM_SKIP_MODEL_NAME_VALIDATION:
            return None
        if found is None and envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING and self.models.lora_resolvers:
            found = await self.models.resolve_lora(model)
        if isinstance(found, LoRARequest):
            defaults = self.adapter_defaults.get(found.lora_name, NO_ADAPTER_DEFAULTS)
            return LoRAAdapter(found.lora_name, found.lora_int_id, found.lora_path, defaults)
        if isinstance(found, ErrorResponse) and found.error.code == HTTPStatus.BAD_REQUEST:
            # A resolver found it, and it cannot be loaded: vLLM's message, as a 400.
            raise VLLMValidationError(found.error.message)
        raise ModelNotFoundError(model)

    async def _listed_adapters(self, request: ImageGenerationRequest) -> tuple[LoRAAdapter, ...]:
        """The adapters `lora` lists, in its order; a 404 naming `lora` for a name that is
        none, a 400 for the base model's."""
        adapters = []
        for choice in request.lora or []:
            if self.models.is_base_model(choice.name):
                raise VLLMValidationError(
                    f"lora lists '{printable(choice.name, 100)}', the base model's name: list "
                    "LoRA adapters only (GET /v1/models lists them).",
                    parameter="lora",
                )
            try:
                adapter = await self._adapter_named(choice.name)
            except ModelNotFoundError:
                raise AdapterNotFoundError(choice.name) from None
            if adapter is None:  # VLLM_SKIP_MODEL_NAME_VALIDATION: vLLM serves the base model
                raise AdapterNotFoundError(choice.name)
            adapters.append(adapter)
        return tuple(adapters)

    async def _generate(
        self, engine_request: EngineRequest, record: _RequestRecord
    ) -> list[Image.Image]:
        """The request's images: the last output of its engine stream."""
        outputs = self.engine_client.generate(engine_request, record.timings)
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                if isinstance(output, FinalImages):
                    return output.images
        raise AssertionError("the engine client ends every stream with images or an error")

    async def _stream(
        self,
        request: ImageGenerationRequest,
        engine_request: EngineRequest,
        usage: ImageUsage,
        record: _RequestRecord,
    ) -> AsyncGenerator[str, None]:
        """Partial-image events, then the completed image or an error event; closing the
        iterator withdraws the request."""
        kind = "image_edit" if isinstance(request, ImageEditRequest) else "image_generation"
        outcome: Outcome = "cancelled"
        try:
            outputs = self.engine_client.generate(engine_request, record.timings, checked=True)
            async with contextlib.aclosing(outputs):
                try:
                    async for output in outputs:
                        if isinstance(output, PreviewImages):
                            [text] = await self._encode(
                                output.images[:1], request, record, encode_image_base64
                            )
                            event = partial_image_event(
                                kind, request, engine_request, text, output.index
                            )
                            yield server_sent_event(event)
                        elif isinstance(output, FinalImages):
                            [completed] = await self._encode(
                                output.images, request, record, encode_image_base64
                            )
                except Exception as exc:
                    outcome, response = self._failed(record, exc)
                    yield server_sent_event(response.model_dump(), event="error")
                    return
            outcome = "ok"
            yield server_sent_event(
                completed_event(kind, request, engine_request, completed, usage.model_dump())
            )
        finally:
            self._finish(record, outcome)

    def _response_format(
        self, request: ImageGenerationRequest, raw_request: Request | None
    ) -> ResponseFormat:
        """The request's `response_format`, or for none the server's default for the name it
        used (a stream's images are inline, a server without an image store has no URLs)."""
        can_link = self.image_store is not None and raw_request is not None
        if request.response_format is None:
            if request.stream or not can_link:
                return "b64_json"
            name = request.model or self.models.base_model_paths[0].name
            return default_response_format(self.default_response_format, name)
        if request.response_format == "url" and not can_link:
            raise VLLMValidationError(
                "response_format 'url' is not available on this server (it has no image "
                "store); use 'b64_json'.",
                parameter="response_format",
            )
        return request.response_format

    def _usage(self, work: EngineRequest) -> ImageUsage:
        engine = self.engine_client.engine
        return image_usage(work, engine.prompt_tokens, engine.defaults.size_multiple)

    async def _deliver(
        self,
        images: list[Image.Image],
        request: ImageGenerationRequest,
        response_format: ResponseFormat,
        record: _RequestRecord,
        raw_request: Request | None,
    ) -> list[ImageObject]:
        """Inline base64, or stored and linked (the store's URL, or the server's absolute one);
        every image is stored before any is linked, so a store failure hands out no URL."""
        if response_format != "url":
            texts = await self._encode(images, request, record, encode_image_base64)
            return [ImageObject(b64_json=text) for text in texts]
        assert self.image_store is not None and raw_request is not None
        blobs = await self._encode(images, request, record, encode_image)
        store = self.image_store
        names = await asyncio.gather(*(store.put(blob, request.output_format) for blob in blobs))
        return [
            ImageObject(url=await store.url_of(name) or self._file_url(name, raw_request))
            for name in names
        ]

    def _file_url(self, name: str, raw_request: Request) -> str:
        if self.image_url_base is not None:
            return f"{self.image_url_base}{IMAGE_FILES_PATH}/{name}"
        return str(raw_request.url_for(IMAGE_FILE_ROUTE, name=name))

    async def _encode(
        self,
        images: list[Image.Image],
        request: ImageGenerationRequest,
        record: _RequestRecord,
        encoder: Callable[[Image.Image, str, int | None], _Encoded],
    ) -> list[_Encoded]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        encoded = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._encode_executor,
                    encoder,
                    image,
                    request.output_format,
                    request.output_compression,
                )
                for image in images
            )
        )
        record.encode_s = time.perf_counter() - started
        record.images = len(encoded)
        return list(encoded)

    def _failed(self, record: _RequestRecord, exc: Exception) -> tuple[Outcome, ErrorResponse]:
        """The answer to a request that raised, from the error table."""
        kind = error_kind(exc)
        if kind.outcome == "error":
            logger.error(
                "Image request %s failed: %s",
                record.request_id,
                printable(str(exc), 500),
                exc_info=self.log_error_stack,
            )
        elif kind.outcome == "out_of_memory":
            logger.warning(
                "Image request %s ran out of device memory: %s",
                record.request_id,
                printable(str(exc), 500),
            )
        return kind.outcome, error_response(exc)

    def _finish(self, record: _RequestRecord, outcome: Outcome) -> None:
        if self.request_metrics is not None:
            self.request_metrics.record_request(outcome, record.images, record.encode_s)
        work = record.engine_request
        if work is None:
            logger.info("Image request %s: %s", record.request_id, outcome)
            return
        timings = record.timings
        adapters = "+".join(f"{s.adapter.name}@{s.scale:g}" for s in work.loras)
        adapter = f", lora={adapters}" if adapters else ""
        logger.info(
            "Image request %s: %s, %dx%d, n=%d, steps=%d%s, queue=%.0fms, engine=%.0fms "
            "(batch of %d), encode=%.0fms, user=%s",
            record.request_id,
            outcome,
            work.width,
            work.height,
            work.num_images,
            work.num_inference_steps,
            adapter,
            timings.queue_s * 1e3,
            timings.engine_s * 1e3,
            timings.batch_images,
            (record.encode_s or 0.0) * 1e3,
            record.user,
        )
