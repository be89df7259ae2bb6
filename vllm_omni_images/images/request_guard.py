"""`guard_route`: the checks every Images API route makes before any work (query parameters,
body size, a JSON key twice), and its parsing errors answered from the error table."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.app_state import images_state
from vllm_omni_images.images.errors import PayloadTooLargeError, error_json, error_response
from vllm_omni_images.images.limits import DEFAULT_LIMITS, BodyKind, ImageLimits, size_text
from vllm_omni_images.images.safe_text import printable


def limits_of(request: Request) -> ImageLimits:
    """The server's limits; the defaults before the app's `ImagesState` is set."""
    images = images_state(request.app.state)
    return DEFAULT_LIMITS if images is None else images.limits


class BodyTooLargeError(HTTPException):
    """The body passed its limit while it was read (an `HTTPException`: FastAPI lets it through)."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)
        self.message = message


RouteHandler = Callable[[Request], Coroutine[Any, Any, Response]]


def guard_route(handler: RouteHandler, body: BodyKind | None) -> RouteHandler:
    """`handler` behind the checks: no query parameter (400), the body within `body`'s limit
    (413), no JSON key twice (400); its parsing errors answered from the error table."""

    async def guarded(request: Request) -> Response:
        if request.query_params:
            names = ", ".join(printable(name, 64) for name in request.query_params)
            return _answer(
                VLLMValidationError(
                    f"Query parameters are not read by this endpoint: {names}. Send every "
                    "field in the body.",
                    parameter=printable(next(iter(request.query_params)), 64),
                )
            )
        if body is not None:
            limit, flag = limits_of(request).body_bytes(body)
            too_large = (
                f"The request body is larger than {size_text(limit)}, the most this server "
                f"reads for {request.url.path} ({flag})."
            )
            if _declared_length(request) > limit:
                return _answer(PayloadTooLargeError(too_large))
            request = _ImageRequest(request.scope, _limited(request.receive, limit, too_large))
        try:
            return await handler(request)
        except BodyTooLargeError as error:
            return _answer(PayloadTooLargeError(error.message))
        except (RequestValidationError, VLLMValidationError) as error:
            # A model validator's `VLLMValidationError` (a field the server never honours)
            # comes through pydantic unwrapped, as it does for vLLM's own request models.
            return _answer(error)
        except HTTPException as error:
            # FastAPI's own 400 for a body it cannot parse (nested too deep for the JSON
            # parser, an integer too long to convert), in OpenAI's shape, with the cause.
            if error.status_code != 400:
                raise
            if isinstance(error.__cause__, DuplicateKeyError):
                key = error.__cause__.key
                return _answer(VLLMValidationError(f"{key} is given twice.", parameter=key))
            cause = f" ({printable(str(error.__cause__), 120)})" if error.__cause__ else ""
            return _answer(VLLMValidationError(f"{error.detail}{cause}."))

    return guarded


def _declared_length(request: Request) -> int:
    """The body's `Content-Length`; -1 when it has none (chunked) or an unreadable one."""
    declared = request.headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()):
        return -1
    return int(declared) if len(declared) <= 18 else 10**18


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key} is given twice")
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKeyError(printable(key, 64))
        found[key] = value
    return found


class _ImageRequest(Request):
    """Starlette's request whose `json()` raises `DuplicateKeyError` for a key given twice."""

    async def json(self) -> Any:
        return json.loads(await self.body(), object_pairs_hook=_unique_keys)


def _limited(receive: Receive, limit: int, message: str) -> Receive:
    """`receive` that raises `BodyTooLargeError` as soon as the body passes `limit` bytes."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        event = await receive()
        if event["type"] == "http.request":
            received += len(event.get("body", b""))
            if received > limit:
                raise BodyTooLargeError(message)
        return event

    return limited


def _answer(error: Exception) -> Response:
    # The connection stays open: the HTTP server discards the rest of a refused body unread
    # by the app, so that the client, which may still be sending it, reads its 413 (closing
    # instead resets the connection under the client, which then sees no answer at all).
    return error_json(error_response(error))
