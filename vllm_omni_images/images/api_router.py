"""HTTP routes of the Images API, attached to vLLM's FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import (
    load_aware_call,
    validate_json_request,
    with_cancellation,
)
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.edits import ImageInputs, read_multipart
from vllm_omni_images.images.errors import PayloadTooLargeError, error_response, response_headers
from vllm_omni_images.images.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ImageVariationRequest,
)
from vllm_omni_images.images.serving import IMAGE_FILE_ROUTE, OpenAIServingImage

router = APIRouter()

IMAGE_FILES_PATH = "/images/files"

# Routes of vLLM's text server that clients may try on an image server. They need a text
# model's tokenizer or engine, which an image model has not, so each answers an OpenAI-style
# 404 that says what this server does serve instead of a bare "Not Found".
TEXT_ONLY_PATHS = (
    "/tokenize",
    "/detokenize",
    "/invocations",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
)


def images(request: Request) -> OpenAIServingImage | None:
    return getattr(request.app.state, "openai_serving_image", None)


@router.post(
    "/v1/images/generations",
    dependencies=[Depends(validate_json_request)],
    responses={
        HTTPStatus.BAD_REQUEST.value: {"model": ErrorResponse},
        HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse},
        HTTPStatus.TOO_MANY_REQUESTS.value: {"model": ErrorResponse},
        HTTPStatus.INTERNAL_SERVER_ERROR.value: {"model": ErrorResponse},
        HTTPStatus.SERVICE_UNAVAILABLE.value: {"model": ErrorResponse},
        HTTPStatus.GATEWAY_TIMEOUT.value: {"model": ErrorResponse},
    },
)
@with_cancellation
@load_aware_call
async def create_image(request: ImageGenerationRequest, raw_request: Request) -> Response:
    handler = images(raw_request)
    if handler is None:
        raise NotImplementedError("The model does not support the Images API")
    return _answer(await handler.create_image(request, raw_request))


_MULTIPART_RESPONSES: dict[int | str, dict[str, Any]] = {
    HTTPStatus.BAD_REQUEST.value: {"model": ErrorResponse},
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE.value: {"model": ErrorResponse},
    HTTPStatus.TOO_MANY_REQUESTS.value: {"model": ErrorResponse},
    HTTPStatus.SERVICE_UNAVAILABLE.value: {"model": ErrorResponse},
}


@router.post("/v1/images/edits", responses=_MULTIPART_RESPONSES)
@load_aware_call
async def create_image_edit(raw_request: Request) -> Response:
    """Multipart, as the openai SDK sends it: `image` (or `image[]`), optional `mask`."""
    return await _serve_multipart(raw_request, ImageEditRequest, allow_mask=True)


@router.post("/v1/images/variations", responses=_MULTIPART_RESPONSES)
@load_aware_call
async def create_image_variation(raw_request: Request) -> Response:
    """Multipart: `image`, and `n`, `size`, `response_format`, `user` (plus the extensions)."""
    return await _serve_multipart(raw_request, ImageVariationRequest, allow_mask=False)


async def _serve_multipart(
    raw_request: Request, request_model: type[ImageEditRequest], *, allow_mask: bool
) -> Response:
    handler = images(raw_request)
    if handler is None:
        raise NotImplementedError("The model does not support the Images API")
    try:
        request, inputs = await read_multipart(
            raw_request,
            request_model,
            allow_mask=allow_mask,
            fetch_remote=handler.fetch_remote_image,
        )
    except (VLLMValidationError, PayloadTooLargeError) as error:
        return _answer(error_response(error))
    # The body is read: from here a client that disconnects cancels the work, as for JSON.
    return await _create_with_inputs(handler, raw_request, request, inputs)


@with_cancellation
async def _create_with_inputs(
    handler: OpenAIServingImage,
    raw_request: Request,
    request: ImageEditRequest,
    inputs: ImageInputs,
) -> Response:
    return _answer(await handler.create_image(request, raw_request, inputs))


def _answer(
    result: ImageGenerationResponse | ErrorResponse | AsyncIterator[str],
) -> Response:
    """The HTTP answer: JSON, or server-sent events for a streamed request."""
    if not isinstance(result, (ImageGenerationResponse, ErrorResponse)):
        return StreamingResponse(result, media_type="text/event-stream")
    if isinstance(result, ErrorResponse):
        return JSONResponse(
            content=result.model_dump(),
            status_code=result.error.code,
            headers=response_headers(result),
        )
    return JSONResponse(content=result.model_dump(exclude_none=True))


# Outside /v1 on purpose: vLLM's --api-key guards /v1 only, and these are capability URLs that
# a browser opens without headers (see file_store.py).
@router.get(f"{IMAGE_FILES_PATH}/{{name}}", name=IMAGE_FILE_ROUTE, include_in_schema=False)
async def image_file(name: str, raw_request: Request) -> Response:
    handler = images(raw_request)
    stored = None
    if handler is not None and handler.image_store is not None:
        stored = handler.image_store.get(name)
    if stored is None:
        error = create_error_response(
            "No such image: it never existed or its URL has expired.",
            err_type="NotFoundError",
            status_code=HTTPStatus.NOT_FOUND,
        )
        return JSONResponse(content=error.model_dump(), status_code=error.error.code)
    return FileResponse(
        stored.path,
        media_type=stored.media_type,
        headers={"Cache-Control": f"private, max-age={int(stored.expires_in_s)}"},
    )


async def text_only_route(raw_request: Request) -> JSONResponse:
    model = getattr(getattr(raw_request.app.state, "args", None), "model", "this model")
    error = create_error_response(
        f"{raw_request.url.path} is not available: this server serves the image model "
        f"`{model}` (vllm serve --task image). Use POST /v1/images/generations.",
        err_type="NotFoundError",
        status_code=HTTPStatus.NOT_FOUND,
    )
    return JSONResponse(content=error.model_dump(), status_code=error.error.code)


for _path in TEXT_ONLY_PATHS:
    router.add_api_route(_path, text_only_route, methods=["POST"], include_in_schema=False)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
