"""HTTP routes of the Images API, attached to vLLM's FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Coroutine
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler
from vllm.entrypoints.serve.utils.api_utils import (
    load_aware_call,
    validate_json_request,
    with_cancellation,
)
from vllm.entrypoints.serve.utils.sse_keep_alive import with_sse_keep_alive
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.app_state import images_state
from vllm_omni_images.images.edits import ImageInputs, read_multipart
from vllm_omni_images.images.errors import (
    ImageNotFoundError,
    PayloadTooLargeError,
    TextOnlyRouteError,
    answered_errors,
    error_json,
    error_response,
)
from vllm_omni_images.images.file_store import ImageStoreError
from vllm_omni_images.images.limits import BodyKind
from vllm_omni_images.images.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ImageVariationRequest,
)
from vllm_omni_images.images.request_guard import guard_route
from vllm_omni_images.images.serving import (
    IMAGE_FILE_ROUTE,
    IMAGE_FILES_PATH,
    OpenAIServingImage,
)

BODY_KINDS: dict[str, BodyKind] = {
    "/v1/images/generations": "json",
    "/v1/images/edits": "form",
    "/v1/images/variations": "form",
}
"""The body limit each route's body is held to (`--image-max-json-mb`, `--image-max-form-mb`)."""


class ImageRoute(APIRoute):
    """The Images API's routes: FastAPI's route, behind the checks that come before any work
    (`request_guard.guard_route`: no query parameters, the body within its limit, validation
    errors answered in short)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return guard_route(super().get_route_handler(), BODY_KINDS.get(self.path))


router = APIRouter(route_class=ImageRoute)

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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status.value: {
        "model": ErrorResponse,
        "description": f"{status.phrase}: {', '.join(types)}",
        **(
            {"headers": {"Retry-After": {"description": "Seconds to wait before a retry."}}}
            if status == HTTPStatus.TOO_MANY_REQUESTS
            else {}
        ),
    }
    for status, types in answered_errors().items()
}
"""The OpenAPI `responses` of each image route: every answer of the error table."""


def images(request: Request) -> OpenAIServingImage | None:
    state = images_state(request.app.state)
    return None if state is None else state.serving


@router.post(
    "/v1/images/generations",
    dependencies=[Depends(validate_json_request)],
    responses=ERROR_RESPONSES,
)
@with_cancellation
@load_aware_call
async def create_image(request: ImageGenerationRequest, raw_request: Request) -> Response:
    handler = images(raw_request)
    if handler is None:
        raise NotImplementedError("The model does not support the Images API")
    return _answer(await handler.create_image(request, raw_request), raw_request)


def multipart_body(request_model: type[ImageEditRequest], *, mask: bool) -> dict[str, Any]:
    """The OpenAPI `requestBody` of a multipart route: the model's text fields, and the image
    (and mask) files. These routes read the form themselves (`edits.read_multipart`), so
    FastAPI cannot derive it; clients and fuzzers read it from `/openapi.json`."""
    schema = request_model.model_json_schema()
    files = {"image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"}}
    if mask:
        files["mask"] = {
            "type": "string",
            "format": "binary",
            "description": "PNG with alpha, the image's size; transparent pixels are edited",
        }
    body = {
        "type": "object",
        "properties": {**files, **schema["properties"]},
        "required": ["image", *schema.get("required", [])],
    }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}


@router.post(
    "/v1/images/edits",
    responses=ERROR_RESPONSES,
    openapi_extra=multipart_body(ImageEditRequest, mask=True),
)
@load_aware_call
async def create_image_edit(raw_request: Request) -> Response:
    """Multipart, as the openai SDK sends it: `image` (or `image[]`), optional `mask`."""
    return await _serve_multipart(raw_request, ImageEditRequest, allow_mask=True)


@router.post(
    "/v1/images/variations",
    responses=ERROR_RESPONSES,
    openapi_extra=multipart_body(ImageVariationRequest, mask=False),
)
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
            limits=handler.limits,
        )
    except (VLLMValidationError, PayloadTooLargeError) as error:
        return _answer(error_response(error), raw_request)
    # The body is read: from here a client that disconnects cancels the work, as for JSON.
    return await _create_with_inputs(handler, raw_request, request, inputs)


@with_cancellation
async def _create_with_inputs(
    handler: OpenAIServingImage,
    raw_request: Request,
    request: ImageEditRequest,
    inputs: ImageInputs,
) -> Response:
    return _answer(await handler.create_image(request, raw_request, inputs), raw_request)


def _answer(
    result: ImageGenerationResponse | ErrorResponse | AsyncGenerator[str, None],
    raw_request: Request,
) -> Response:
    """The HTTP answer: JSON, or server-sent events for a streamed request, with vLLM's
    keep-alive comments while no event comes (`--sse-keep-alive-interval`, as vLLM's chat
    stream: a large model can take minutes before its first partial image)."""
    if not isinstance(result, (ImageGenerationResponse, ErrorResponse)):
        args = getattr(raw_request.app.state, "args", None)
        interval = float(getattr(args, "sse_keep_alive_interval", 0))
        return StreamingResponse(
            with_sse_keep_alive(result, interval), media_type="text/event-stream"
        )
    if isinstance(result, ErrorResponse):
        return error_json(result)
    return JSONResponse(content=result.model_dump(exclude_none=True))


# Outside /v1 on purpose: vLLM's --api-key guards /v1 only, and these are capability URLs that
# a browser opens without headers (docs/image_api.md, "Image URLs"). Every path below
# /images/files/ comes here (`:path`), so a name with a `/` is this route's 404 in OpenAI's
# shape, not FastAPI's; HEAD answers as GET without the body (uvicorn sends none).
@router.api_route(
    f"{IMAGE_FILES_PATH}/{{name:path}}",
    methods=["GET", "HEAD"],
    name=IMAGE_FILE_ROUTE,
    response_class=FileResponse,
    responses={
        HTTPStatus.OK.value: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        HTTPStatus.BAD_REQUEST.value: {"model": ErrorResponse},
        HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse},
        HTTPStatus.SERVICE_UNAVAILABLE.value: {"model": ErrorResponse},
    },
)
async def image_file(name: str, raw_request: Request) -> Response:
    handler = images(raw_request)
    stored = None
    if handler is not None and handler.image_store is not None:
        try:
            stored = await handler.image_store.get(name)
        except ImageStoreError as error:  # the shared store is down: it may come back
            return error_json(error_response(error))
    if stored is None:
        return error_json(error_response(ImageNotFoundError(name)))
    headers = {"Cache-Control": f"private, max-age={int(stored.expires_in_s)}"}
    if stored.path is not None:
        return FileResponse(stored.path, media_type=stored.media_type, headers=headers)
    return Response(stored.data, media_type=stored.media_type, headers=headers)


async def text_only_route(raw_request: Request) -> JSONResponse:
    model = getattr(getattr(raw_request.app.state, "args", None), "model", "this model")
    return error_json(error_response(TextOnlyRouteError(raw_request.url.path, model)))


for _path in TEXT_ONLY_PATHS:
    router.add_api_route(
        _path,
        text_only_route,
        methods=["POST"],
        include_in_schema=False,
        route_class_override=APIRoute,  # vLLM's routes by name: none of the Images API's checks
    )


async def starlette_http_error(request: Request, error: Exception) -> Response:
    """Starlette's own refusals, for a path no route serves (404) or a method its route does
    not take (405, with its `Allow`), in OpenAI's error shape as vLLM answers FastAPI's
    `HTTPException`s (vLLM's app leaves Starlette's to Starlette: `{"detail": "Not Found"}`)."""
    assert isinstance(error, StarletteHTTPException)
    response = await http_exception_handler(request, error)  # type: ignore[arg-type]
    response.headers.update(error.headers or {})
    return response


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
