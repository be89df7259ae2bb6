"""The error table: how every exception a request can meet reaches the client and the metrics.

Each row maps an exception class to its HTTP status, OpenAI error type, metrics outcome and
the message the client reads; `error_response` builds vLLM's `ErrorResponse` from the first
row that matches, through vLLM's own `create_error_response`. Every Images API endpoint
answers its errors through this one table.

A full queue is **429** (`RateLimitError`) with `Retry-After`, where vLLM's text server answers
503 for its `QueueOverflowError`. 429 is OpenAI's own answer to "too busy, retry later", and
the `openai` SDK and the tools built for DALL-E retry it after `Retry-After`; 503 here means
the server cannot serve at all (no model, shutting down, out of device memory). A load
balancer that sends 503s elsewhere should treat a 429 from an image server the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from http import HTTPStatus

from pydantic import Field
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.engine.errors import (
    EngineDiedError,
    EngineNotReadyError,
    EngineOutOfMemoryError,
    EngineRequestError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
    SchedulerClosedError,
)
from vllm_omni_images.engine.metrics import Outcome


@dataclass(frozen=True)
class ErrorKind:
    """How one class of failure is answered."""

    status: HTTPStatus
    type: str
    outcome: Outcome
    message: str = "{error}"
    """What the client reads; `{error}` is the exception's own message."""
    param: str | None = None
    """The request field at fault, for errors that always name the same one."""


class PayloadTooLargeError(ValueError):
    """An uploaded file is larger than the server accepts."""


_INVALID = ErrorKind(HTTPStatus.BAD_REQUEST, "BadRequestError", "invalid")
_UNAVAILABLE = ErrorKind(HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError", "unavailable")

ERROR_TABLE: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (VLLMValidationError, _INVALID),  # a field the served model cannot honour; names it
    (
        RequestTooLargeError,
        ErrorKind(
            HTTPStatus.BAD_REQUEST,
            "BadRequestError",
            "invalid",
            "n={error.num_images} is more images than this server queues at once "
            "({error.max_queue_images}, its --image-max-queue).",
            param="n",
        ),
    ),
    (
        QueueFullError,
        ErrorKind(
            HTTPStatus.TOO_MANY_REQUESTS,
            "RateLimitError",
            "rejected",
            "The server is busy: {error}",
        ),
    ),
    (
        RequestTimeoutError,
        ErrorKind(
            HTTPStatus.GATEWAY_TIMEOUT,
            "TimeoutError",
            "timeout",
            "{error} Its work was stopped (the server's --image-request-timeout); retry later, "
            "or ask for fewer steps or smaller images.",
        ),
    ),
    (EngineRequestError, _INVALID),  # the engine's own check of the request
    (
        PayloadTooLargeError,
        ErrorKind(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "BadRequestError", "invalid"),
    ),
    (EngineNotReadyError, _UNAVAILABLE),
    (SchedulerClosedError, _UNAVAILABLE),
    (
        EngineDiedError,
        ErrorKind(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "unavailable",
            "The image engine stopped working ({error}); the server must be restarted.",
        ),
    ),
    (
        EngineOutOfMemoryError,
        ErrorKind(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "out_of_memory",
            "The server ran out of GPU memory generating this request; retry later or ask for "
            "fewer or smaller images.",
        ),
    ),
)

INTERNAL_ERROR = ErrorKind(
    HTTPStatus.INTERNAL_SERVER_ERROR,
    "InternalServerError",
    "error",
    "Image generation failed: {error}",
)
"""Anything else: an engine error or a bug fails its request, never the server."""


def error_kind(error: Exception) -> ErrorKind:
    for error_class, kind in ERROR_TABLE:
        if isinstance(error, error_class):
            return kind
    return INTERNAL_ERROR


class ImageErrorResponse(ErrorResponse):
    """vLLM's `ErrorResponse` with the HTTP headers its row adds (`Retry-After`); the
    headers travel beside the JSON body, never in it."""

    headers: dict[str, str] = Field(default_factory=dict, exclude=True)


def error_response(error: Exception) -> ImageErrorResponse:
    """The client's answer to `error`, from its row of the table."""
    kind = error_kind(error)
    param = kind.param
    if isinstance(error, VLLMValidationError):
        param = error.parameter
    response = create_error_response(
        kind.message.format(error=error), err_type=kind.type, status_code=kind.status, param=param
    )
    headers = {}
    if isinstance(error, QueueFullError):
        headers["Retry-After"] = str(math.ceil(error.retry_after_s))
    return ImageErrorResponse(error=response.error, headers=headers)


def response_headers(response: ErrorResponse) -> dict[str, str]:
    """The headers to send with an error answer (none for vLLM's own `ErrorResponse`s)."""
    return response.headers if isinstance(response, ImageErrorResponse) else {}
