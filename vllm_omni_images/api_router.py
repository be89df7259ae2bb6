"""HTTP routes of the Images API, attached to vLLM's FastAPI app."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import (
    load_aware_call,
    validate_json_request,
    with_cancellation,
)

from vllm_omni_images.protocol import ImageGenerationRequest
from vllm_omni_images.serving import OpenAIServingImage

router = APIRouter()

# Core routes that need a text model's tokenizer or engine; an image server has neither.
UNSUPPORTED_CORE_PATHS = frozenset({"/tokenize", "/detokenize", "/invocations"})


def images(request: Request) -> OpenAIServingImage | None:
    return getattr(request.app.state, "openai_serving_image", None)


@router.post(
    "/v1/images/generations",
    dependencies=[Depends(validate_json_request)],
    responses={
        HTTPStatus.BAD_REQUEST.value: {"model": ErrorResponse},
        HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse},
        HTTPStatus.INTERNAL_SERVER_ERROR.value: {"model": ErrorResponse},
        HTTPStatus.SERVICE_UNAVAILABLE.value: {"model": ErrorResponse},
    },
)
@with_cancellation
@load_aware_call
async def create_image(request: ImageGenerationRequest, raw_request: Request) -> JSONResponse:
    handler = images(raw_request)
    if handler is None:
        raise NotImplementedError("The model does not support the Images API")
    result = await handler.create_image(request, raw_request)
    if isinstance(result, ErrorResponse):
        return JSONResponse(content=result.model_dump(), status_code=result.error.code)
    return JSONResponse(content=result.model_dump())


def remove_unsupported_core_routes(app: FastAPI) -> None:
    app.router.routes[:] = [
        route
        for route in app.router.routes
        if getattr(route, "path", None) not in UNSUPPORTED_CORE_PATHS
    ]


def attach_router(app: FastAPI) -> None:
    remove_unsupported_core_routes(app)
    app.include_router(router)
