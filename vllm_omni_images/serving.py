"""`OpenAIServingImage`: turns an Images API request into engine work and back.

Like vLLM's `OpenAIServing*` handlers, it returns either the response model or vLLM's
`ErrorResponse`, so the router only serialises what it gets.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from http import HTTPStatus

from fastapi import Request
from vllm.entrypoints.openai.models.serving import OpenAIModelRegistry
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.logger import init_logger
from vllm.utils import random_uuid

from vllm_omni_images.encoding import encode_image_base64
from vllm_omni_images.engine import (
    EngineError,
    EngineOutOfMemoryError,
    EngineRequest,
    ModelDefaults,
)
from vllm_omni_images.engine_client import EngineNotReadyError, ImageEngineClient
from vllm_omni_images.protocol import (
    ImageGenerationRequest,
    ImageGenerationResponse,
    ImageObject,
    parse_size,
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


class OpenAIServingImage:
    def __init__(
        self,
        engine_client: ImageEngineClient,
        models: OpenAIModelRegistry,
        *,
        log_error_stack: bool = False,
    ) -> None:
        self.engine_client = engine_client
        self.models = models
        self.log_error_stack = log_error_stack

    @staticmethod
    def _request_id(raw_request: Request | None) -> str:
        header = raw_request.headers.get("X-Request-Id") if raw_request is not None else None
        return header or f"img-{random_uuid()}"

    async def create_image(
        self, request: ImageGenerationRequest, raw_request: Request | None = None
    ) -> ImageGenerationResponse | ErrorResponse:
        if (error := await self.models.check_model(request.model)) is not None:
            return error
        request_id = self._request_id(raw_request)
        try:
            engine_request = to_engine_request(request, self.engine_client.defaults, request_id)
        except RequestError as exc:
            return create_error_response(str(exc), param=exc.param)
        except EngineNotReadyError as exc:
            return self._unavailable(str(exc))

        started = time.perf_counter()
        logger.info(
            "Image request %s: %dx%d, n=%d, steps=%d, user=%s",
            request_id,
            engine_request.width,
            engine_request.height,
            engine_request.num_images,
            engine_request.num_inference_steps,
            request.user,
        )
        try:
            images = await self.engine_client.generate(engine_request)
        except EngineNotReadyError as exc:
            return self._unavailable(str(exc))
        except EngineOutOfMemoryError as exc:
            logger.warning("Image request %s ran out of device memory: %s", request_id, exc)
            return self._unavailable(
                "The server ran out of GPU memory generating this request; retry later or "
                "ask for fewer or smaller images."
            )
        except EngineError as exc:
            return self._internal_error(request_id, exc)
        except Exception as exc:  # an engine bug must fail this request, not the server
            return self._internal_error(request_id, exc)

        quality = request.output_compression
        encoded = await asyncio.gather(
            *(
                asyncio.to_thread(encode_image_base64, image, request.output_format, quality)
                for image in images
            )
        )
        logger.info(
            "Image request %s done in %.0f ms", request_id, (time.perf_counter() - started) * 1e3
        )
        return ImageGenerationResponse(
            data=[ImageObject(b64_json=data) for data in encoded],
            size=f"{engine_request.width}x{engine_request.height}",
            output_format=request.output_format,
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
