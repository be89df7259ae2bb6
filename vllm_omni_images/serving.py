"""`OpenAIServingImage`: turns an Images API request into engine work and back.

Like vLLM's `OpenAIServing*` handlers, it returns either the response model or vLLM's
`ErrorResponse`, so the router only serialises what it gets.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus

from fastapi import Request
from pydantic import Field
from vllm.entrypoints.openai.models.serving import OpenAIModelRegistry
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse
from vllm.logger import init_logger
from vllm.utils import random_uuid

from vllm_omni_images.encoding import encode_image_base64
from vllm_omni_images.engine import (
    EngineOutOfMemoryError,
    EngineRequest,
    ModelDefaults,
)
from vllm_omni_images.engine_client import EngineNotReadyError, ImageEngineClient
from vllm_omni_images.metrics import Outcome
from vllm_omni_images.protocol import (
    ImageGenerationRequest,
    ImageGenerationResponse,
    ImageObject,
    parse_size,
)
from vllm_omni_images.scheduler import (
    QueueFullError,
    RequestTimeoutError,
    RequestTimings,
    SchedulerClosedError,
    yield_cpu_to_serving,
)

logger = init_logger(__name__)

UINT64_MASK = 2**64 - 1


class RequestError(ValueError):
    """A request the served model cannot honour, naming the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def image_seeds(seed: int | None, n: int) -> tuple[int, ...]:
    """One seed per image: `seed, seed+1, ...` so the `n` images of a request differ and a
    request is reproducible; a random base seed when none is given."""
    base = secrets.randbits(63) if seed is None else seed
    # torch's generators take 64-bit unsigned seeds; wrapping keeps int64 input valid.
    return tuple((base + offset) & UINT64_MASK for offset in range(n))


def resolve_size(size: str | None, defaults: ModelDefaults) -> tuple[int, int]:
    if size is None or size == "auto":
        return defaults.width, defaults.height
    width, height = parse_size(size)
    multiple = defaults.size_multiple
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise RequestError(
            f"size {size!r} is not supported by this model: width and height must be "
            f"positive multiples of {multiple} (e.g. '{defaults.width}x{defaults.height}').",
            param="size",
        )
    if width * height > defaults.max_pixels:
        raise RequestError(
            f"size {size!r} is too large: this server generates at most "
            f"{defaults.max_pixels} pixels per image.",
            param="size",
        )
    return width, height


def to_engine_request(
    request: ImageGenerationRequest, defaults: ModelDefaults, request_id: str
) -> EngineRequest:
    """Apply the model's defaults and the request's overrides; raise `RequestError`."""
    if request.response_format == "url":
        raise RequestError(
            "response_format 'url' is not supported yet: this server returns images inline; "
            "use 'b64_json'.",
            param="response_format",
        )
    if request.background == "transparent":
        raise RequestError(
            "background 'transparent' is not supported: this model generates opaque images.",
            param="background",
        )
    width, height = resolve_size(request.size, defaults)
    true_cfg_scale = request.true_cfg_scale
    if true_cfg_scale is None:
        true_cfg_scale = defaults.true_cfg_scale
    guidance_scale = request.guidance_scale
    if guidance_scale is None:
        guidance_scale = defaults.guidance_scale
    return EngineRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seeds=image_seeds(request.seed, request.n),
        width=width,
        height=height,
        num_inference_steps=request.num_inference_steps or defaults.num_inference_steps,
        true_cfg_scale=true_cfg_scale,
        guidance_scale=guidance_scale,
        request_id=request_id,
    )


class RetryLaterResponse(ErrorResponse):
    """An `ErrorResponse` the client should retry; the router sends `Retry-After`."""

    retry_after_s: int = Field(default=1, exclude=True)


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
        models: OpenAIModelRegistry,
        *,
        log_error_stack: bool = False,
        encode_executor: Executor | None = None,
    ) -> None:
        self.engine_client = engine_client
        self.models = models
        self.log_error_stack = log_error_stack
        self.metrics = engine_client.metrics
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
        return header or f"img-{random_uuid()}"

    async def create_image(
        self, request: ImageGenerationRequest, raw_request: Request | None = None
    ) -> ImageGenerationResponse | ErrorResponse:
        record = _RequestRecord(self._request_id(raw_request), request.user)
        outcome: Outcome = "cancelled"  # unless the handler gets to say otherwise
        try:
            outcome, result = await self._create_image(request, record)
            return result
        except Exception:
            outcome = "error"
            raise
        finally:
            self._finish(record, outcome)

    async def _create_image(
        self, request: ImageGenerationRequest, record: _RequestRecord
    ) -> tuple[Outcome, ImageGenerationResponse | ErrorResponse]:
        if (error := await self.models.check_model(request.model)) is not None:
            return "invalid", error
        try:
            engine_request = to_engine_request(
                request, self.engine_client.defaults, record.request_id
            )
            self._check_fits_queue(engine_request)
        except RequestError as exc:
            return "invalid", create_error_response(str(exc), param=exc.param)
        except EngineNotReadyError as exc:
            return "unavailable", self._unavailable(str(exc))
        record.engine_request = engine_request

        try:
            images = await self.engine_client.generate(engine_request, record.timings)
        except QueueFullError as exc:
            retry_after_s = math.ceil(exc.retry_after_s)
            return "rejected", RetryLaterResponse(
                error=ErrorInfo(
                    message=f"The server is busy: {exc}",
                    type="RateLimitError",
                    code=HTTPStatus.TOO_MANY_REQUESTS,
                ),
                retry_after_s=retry_after_s,
            )
        except RequestTimeoutError as exc:
            return "timeout", create_error_response(
                f"{exc} Its work was stopped (the server's --image-request-timeout); "
                "retry later, or ask for fewer steps or smaller images.",
                err_type="TimeoutError",
                status_code=HTTPStatus.GATEWAY_TIMEOUT,
            )
        except (EngineNotReadyError, SchedulerClosedError) as exc:
            return "unavailable", self._unavailable(str(exc))
        except EngineOutOfMemoryError as exc:
            logger.warning("Image request %s ran out of device memory: %s", record.request_id, exc)
            return "out_of_memory", self._unavailable(
                "The server ran out of GPU memory generating this request; retry later or "
                "ask for fewer or smaller images."
            )
        except Exception as exc:  # an engine error or bug fails this request, not the server
            return "error", self._internal_error(record.request_id, exc)

        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        quality = request.output_compression
        try:
            encoded = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._encode_executor,
                        encode_image_base64,
                        image,
                        request.output_format,
                        quality,
                    )
                    for image in images
                )
            )
        except Exception as exc:
            return "error", self._internal_error(record.request_id, exc)
        record.encode_s = time.perf_counter() - started
        record.images = len(encoded)
        return "ok", ImageGenerationResponse(
            data=[ImageObject(b64_json=data) for data in encoded],
            size=f"{engine_request.width}x{engine_request.height}",
            output_format=request.output_format,
        )

    def _check_fits_queue(self, engine_request: EngineRequest) -> None:
        scheduler = self.engine_client.scheduler
        if scheduler is not None and engine_request.num_images > scheduler.config.max_queue_images:
            raise RequestError(
                f"n={engine_request.num_images} is more images than this server queues at "
                f"once ({scheduler.config.max_queue_images}, its --image-max-queue).",
                param="n",
            )

    def _finish(self, record: _RequestRecord, outcome: Outcome) -> None:
        if self.metrics is not None:
            self.metrics.record_request(outcome, record.images, record.encode_s)
        work = record.engine_request
        if work is None:
            logger.info("Image request %s: %s", record.request_id, outcome)
            return
        timings = record.timings
        logger.info(
            "Image request %s: %s, %dx%d, n=%d, steps=%d, queue=%.0fms, engine=%.0fms "
            "(batch of %d), encode=%.0fms, user=%s",
            record.request_id,
            outcome,
            work.width,
            work.height,
            work.num_images,
            work.num_inference_steps,
            timings.queue_s * 1e3,
            timings.engine_s * 1e3,
            timings.batch_images,
            (record.encode_s or 0.0) * 1e3,
            record.user,
        )

    @staticmethod
    def _unavailable(message: str) -> ErrorResponse:
        return create_error_response(
            message, err_type="ServiceUnavailableError", status_code=HTTPStatus.SERVICE_UNAVAILABLE
        )

    def _internal_error(self, request_id: str, exc: Exception) -> ErrorResponse:
        logger.error("Image request %s failed: %s", request_id, exc, exc_info=self.log_error_stack)
        return create_error_response(
            f"Image generation failed: {exc}",
            err_type="InternalServerError",
            status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
        )
