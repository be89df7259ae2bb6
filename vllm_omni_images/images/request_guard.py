"""`guard_route`: the checks every Images API route makes before any work (query parameters,
body size and deadline, a JSON key twice), and its parsing errors answered from the error
table."""

from __future__ import annotations

import asyncio
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
from vllm_omni_images.images.errors import (
    PayloadTooLargeError,
    ReadTimeoutError,
    error_json,
    error_kind,
    error_response,
)
from vllm_omni_images.images.limits import DEFAULT_LIMITS, BodyKind, ImageLimits, size_text
from vllm_omni_images.images.safe_text import printable


def limits_of(request: Request) -> ImageLimits:
    """The server's limits; the defaults before the app's `ImagesState` is set."""
    images = images_state(request.app.state)
    return DEFAULT_LIMITS if images is None else images.limits


class BodyReadError(HTTPException):
    """The body could not be read within the route's limits: its size (`PayloadTooLargeError`,
    413) or its deadline (`ReadTimeoutError`, 408). An `HTTPException`, so that FastAPI's body
    parsing and the form reader let it through to `guard_route`, which answers `error`."""

    def __init__(self, error: PayloadTooLargeError | ReadTimeoutError) -> None:
        super().__init__(status_code=error_kind(error).status, detail=str(error))
        self.error = error


RouteHandler = Callable[[Request], Coroutine[Any, Any, Response]]


def guard_route(handler: RouteHandler, body: BodyKind | None) -> RouteHandler:
    """`handler` behind the checks: no query parameter (400), the body within `body`'s limit
    (413) and all of it within `--image-body-timeout` (408), no JSON key twice (400); its
    parsing errors answered from the error table."""

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
            limits = limits_of(request)
            limit, flag = limits.body_bytes(body)
            too_large = PayloadTooLargeError(
                f"The request body is larger than {size_text(limit)}, the most this server "
                f"reads for {request.url.path} ({flag})."
            )
            if _declared_length(request) > limit:
                return _answer(too_large)
            receive = _read_within(request.receive, limit, too_large, limits.body_timeout_s)
            request = _ImageRequest(request.scope, receive)
        try:
            return await handler(request)
        except BodyReadError as error:
            return _answer(error.error)
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


def _read_within(
    receive: Receive, limit: int, too_large: PayloadTooLargeError, timeout_s: float | None
) -> Receive:
    """`receive` that raises `BodyReadError` as soon as the body passes `limit` bytes
    (`too_large`), or when it has not all arrived `timeout_s` seconds from now; once it has,
    `receive` unbounded (a route listens through it for the client leaving)."""
    received = 0
    complete = False
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

    async def read() -> Message:
        nonlocal received, complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                event = await receive()
        except TimeoutError:
            raise BodyReadError(
                ReadTimeoutError(
                    f"The request body did not all arrive within {timeout_s:g} s ({received} "
                    "bytes came), the most this server waits for one (--image-body-timeout)."
                )
            ) from None
        if event["type"] == "http.request":
            received += len(event.get("body", b""))
            if received > limit:
                raise BodyReadError(too_large)
            complete = not event.get("more_body", False)
        return event

    return read


def _answer(error: Exception) -> Response:
    # The connection stays open after a 413: the HTTP server discards the rest of a refused
    # body unread by the app, so that the client, which may still be sending it, reads its 413
    # (closing instead resets the connection under the client, which then sees no answer at
    # all); for as long as `--image-header-timeout` allows (server/http_protocol.py). A 408
    # closes it (its `Connection: close`): that client is too slow to wait for.
    return error_json(error_response(error))
