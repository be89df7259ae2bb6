"""The error table: each exception class's HTTP status, OpenAI error type, metrics outcome and
message (`error_response`). Every error an Images API route answers comes from it, but vLLM's
501 where the engine is not an image engine (docs/architecture.md, "Errors")."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineHungError,
    EngineNotReadyError,
    EngineOutOfMemoryError,
    EngineRequestError,
    LoRAAdapterUnavailableError,
    LoRAStackError,
    QueueFullError,
    RequestOverBudgetError,
    RequestTimeoutError,
    RequestTooLargeError,
)
from vllm_omni_images.images.file_store import ImageStoreError
from vllm_omni_images.images.request_metrics import Outcome
from vllm_omni_images.images.safe_text import echo, printable


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


class HeadTooLargeError(ValueError):
    """A request head (request line and headers) larger than the server reads."""


class ReadTimeoutError(Exception):
    """The client did not send its request (its head, or its body) within the server's deadline
    for it; the message names the flag. Answered with `Connection: close` (RFC 9110, 408)."""


class ModelNotFoundError(LookupError):
    """A request's `model` is neither a name of the served model nor one of its adapters."""

    def __init__(self, model: str) -> None:
        self.model = printable(model, 100)  # a long name is echoed only in part
        super().__init__(self.model)


class AdapterNotFoundError(ModelNotFoundError):
    """A name in a request's `lora` is not one of the served model's adapters."""


class ImageNotFoundError(LookupError):
    """No stored image has this name: it never existed or its URL has expired."""


class TextOnlyRouteError(LookupError):
    """A route of vLLM's text server, which an image model cannot serve."""

    def __init__(self, path: str, model: str) -> None:
        self.path = path
        self.model = model
        super().__init__(path)


_INVALID = ErrorKind(HTTPStatus.BAD_REQUEST, "BadRequestError", "invalid")
_UNAVAILABLE = ErrorKind(HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError", "unavailable")

ERROR_TABLE: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (VLLMValidationError, _INVALID),  # a field the served model cannot honour; names it
    # pydantic's, for a body (FastAPI's) or a form: the message says what, in short
    (RequestValidationError, _INVALID),
    (ValidationError, _INVALID),
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
    (RequestOverBudgetError, _INVALID),  # names `n` or `size` and what fits
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
    (
        LoRAStackError,  # adapters the engine cannot apply together; names them
        ErrorKind(HTTPStatus.BAD_REQUEST, "BadRequestError", "invalid", param="lora"),
    ),
    (EngineRequestError, _INVALID),  # the engine's own check of the request
    (
        PayloadTooLargeError,
        ErrorKind(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "BadRequestError", "invalid"),
    ),
    (ReadTimeoutError, ErrorKind(HTTPStatus.REQUEST_TIMEOUT, "TimeoutError", "invalid")),
    (
        HeadTooLargeError,
        ErrorKind(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "BadRequestError", "invalid"),
    ),
    (EngineNotReadyError, _UNAVAILABLE),
    (EngineClosedError, _UNAVAILABLE),
    (
        EngineDiedError,
        ErrorKind(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "unavailable",
            "The image engine stopped working ({error}); the server must be restarted.",
        ),
    ),
    (EngineHungError, _UNAVAILABLE),  # until its call returns; the message says so
    (
        LoRAAdapterUnavailableError,  # its own requests only; the message names it, and why
        ErrorKind(
            HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError", "unavailable", param="model"
        ),
    ),
    (
        ImageStoreError,  # `response_format: url` only; the images already stored stay
        ErrorKind(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "unavailable",
            "The image store is unavailable ({error}); retry later, or ask for "
            "response_format 'b64_json'.",
        ),
    ),
    (
        AdapterNotFoundError,  # as vLLM's 404 for a model, naming lora
        ErrorKind(
            HTTPStatus.NOT_FOUND,
            "NotFoundError",
            "invalid",
            "The LoRA adapter `{error.model}` in lora does not exist (GET /v1/models lists "
            "the adapters).",
            param="lora",
        ),
    ),
    (
        ModelNotFoundError,  # vLLM's 404
        ErrorKind(
            HTTPStatus.NOT_FOUND,
            "NotFoundError",
            "invalid",
            "The model `{error.model}` does not exist.",
            param="model",
        ),
    ),
    (
        ImageNotFoundError,
        ErrorKind(
            HTTPStatus.NOT_FOUND,
            "NotFoundError",
            "invalid",
            "No such image: it never existed or its URL has expired.",
        ),
    ),
    (
        TextOnlyRouteError,  # says what this server serves instead of a bare "Not Found"
        ErrorKind(
            HTTPStatus.NOT_FOUND,
            "NotFoundError",
            "invalid",
            "{error.path} is not available: this server serves the image model "
            "`{error.model}` (vllm serve --task image). Use POST /v1/images/generations.",
        ),
    ),
    (
        EngineOutOfMemoryError,
        ErrorKind(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "out_of_memory",
            "The server ran out of GPU memory generating this request ({error}); retry later "
            "or ask for fewer or smaller images.",
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


def answered_errors() -> dict[HTTPStatus, list[str]]:
    """Each status other than 200 that the table (and its 500) answers, with its error types."""
    answered: dict[HTTPStatus, list[str]] = {}
    for kind in [*(kind for _, kind in ERROR_TABLE), INTERNAL_ERROR]:
        types = answered.setdefault(kind.status, [])
        if kind.type not in types:
            types.append(kind.type)
    return dict(sorted(answered.items()))


def error_kind(error: Exception) -> ErrorKind:
    for error_class, kind in ERROR_TABLE:
        if isinstance(error, error_class):
            return kind
    return INTERNAL_ERROR


class ImageErrorResponse(ErrorResponse):
    """vLLM's `ErrorResponse` with the HTTP headers its row adds (`Retry-After`)."""

    headers: dict[str, str] = Field(default_factory=dict, exclude=True)


def error_response(error: Exception) -> ImageErrorResponse:
    """The client's answer to `error`, from its row of the table."""
    kind = error_kind(error)
    param = kind.param
    message = kind.message.format(error=error)
    if isinstance(error, (VLLMValidationError, RequestOverBudgetError)):
        param = error.parameter
    elif isinstance(error, (RequestValidationError, ValidationError)):
        message, param = describe_validation_errors(error.errors())
    response = create_error_response(
        message, err_type=kind.type, status_code=kind.status, param=param
    )
    headers = {}
    if isinstance(error, QueueFullError):
        headers["Retry-After"] = str(math.ceil(error.retry_after_s))
    elif isinstance(error, ReadTimeoutError):
        headers["Connection"] = "close"  # the rest of a late request is not waited for
    return ImageErrorResponse(error=response.error, headers=headers)


def response_headers(response: ErrorResponse) -> dict[str, str]:
    """The headers to send with an error answer (none for vLLM's own `ErrorResponse`s)."""
    return response.headers if isinstance(response, ImageErrorResponse) else {}


def error_json(response: ErrorResponse) -> JSONResponse:
    """The HTTP answer of an error: OpenAI's JSON, its status, and its headers."""
    return JSONResponse(
        content=response.model_dump(),
        status_code=response.error.code,
        headers=response_headers(response),
    )


MAX_REPORTED_ERRORS = 5


def describe_validation_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """pydantic's errors as one short message (`field: what is wrong (got <prefix>)`) and the
    first field; a wrapped `VLLMValidationError` reads as unwrapped (its message, `parameter`)."""
    parts: list[str] = []
    param: str | None = None
    refused: str | None = None
    for error in errors[:MAX_REPORTED_ERRORS]:
        if not isinstance(error, Mapping):  # FastAPI's plain-text errors (a content type)
            parts.append(printable(str(error), 200))
            continue
        context = error.get("ctx")
        cause = context.get("error") if isinstance(context, Mapping) else None
        if isinstance(cause, VLLMValidationError):
            parts.append(str(cause))
            refused = refused or cause.parameter
            continue
        loc = tuple(error.get("loc", ()))
        kind = error.get("type")
        if kind == "json_invalid":
            reason = printable(str(error.get("ctx", {}).get("error", "")), 100)
            parts.append(f"The body is not valid JSON ({reason} at position {loc[-1]}).")
            continue
        where = printable(clean_loc_for_param(loc), 64) if loc else ""
        param = param or where or None
        field = where.removeprefix("body.") or "body"
        what = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            what = "this API has no such field (check its spelling), so it is not read"
        elif kind != "missing" and "input" in error:
            what = f"{what} (got {echo(error['input'])})"
        parts.append(what if what.startswith(field) else f"{field}: {what}")
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more")
    return "; ".join(parts) or "The request is not valid.", refused or param
