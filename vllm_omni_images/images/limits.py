"""The limits a request is held to before any work is done for it.

Every limit is a `vllm serve` flag (`server/cli_args.py`); `ImageLimits` carries their values
to the routes and the serving object. Each is checked as early as what it bounds is known:

- **the body**, before it is read: `guard_route` wraps every Images API route (FastAPI's
  custom `APIRoute`, `api_router.ImageRoute`). A `Content-Length` above the limit is refused
  with 413 before a byte is read; a body without one (chunked) or longer than it says is
  refused as soon as the bytes read pass the limit, so the rest is never read. JSON bodies
  (generations) and forms (edits, variations) have their own limits.
- **query parameters**: none of these routes reads one, so any is a 400 that names it, before
  the body is read (nothing a client sends is dropped unread); nor is a JSON key given twice
  (JSON parsers keep the last), a 400 naming it.
- **form parts** (count, size of each text field): Starlette's own `request.form()` options,
  set from these limits in `edits.py`; each image is checked against its byte and pixel limits
  from its header, before it is decoded.
- **prompts and pixels**: as the request is mapped to engine work (`protocol.py`), before the
  engine sees it: a 400 naming `prompt`, `size` or `n`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.errors import (
    PayloadTooLargeError,
    error_json,
    error_response,
    printable,
)

MiB = 1024 * 1024

BodyKind = Literal["json", "form"]
"""Which body limit a route's body is held to."""


@dataclass(frozen=True)
class ImageLimits:
    """What one request may ask for and send; the defaults are the flags' defaults."""

    max_json_bytes: int = MiB
    """A JSON body (generations). Two prompts at the limit, every character escaped, fit."""
    max_form_bytes: int | None = None
    """A form body (edits, variations); `None`: room for every allowed input and a mask at
    their largest (see `form_bytes`)."""
    max_prompt_chars: int = 32_000
    """`prompt` and `negative_prompt`, each."""
    max_pixels: int | None = None
    """Width x height of one output image; `None`: the model's own limit
    (`ModelDefaults.max_pixels`, 2048x2048 unless its folder says otherwise)."""
    max_request_pixels: int = 4 * 2048 * 2048
    """`n` x width x height of one request: what its images cost the engine together."""
    max_input_images: int = 16
    """Images one edit or variation may send."""
    max_input_bytes: int = 20 * MiB
    """One input image (or mask), encoded: a file, a `data:` URL's bytes, a fetched URL."""
    max_input_pixels: int = 4096 * 4096
    """One input image (or mask), read from its header before it is decoded."""

    @property
    def form_bytes(self) -> int:
        """The form body limit: as set, or every input and a mask at their largest, plus
        1 MiB for the text fields."""
        if self.max_form_bytes is not None:
            return self.max_form_bytes
        return (self.max_input_images + 1) * self.max_input_bytes + MiB

    @property
    def form_field_bytes(self) -> int:
        """One text field of a form: room for a `data:` URL of the largest input (base64 is
        4/3 of the bytes; a urlencoded form escapes some of its characters again)."""
        return 2 * self.max_input_bytes + 64 * 1024

    def body_bytes(self, kind: BodyKind) -> tuple[int, str]:
        """The limit for a body of `kind`, and the flag that sets it."""
        if kind == "json":
            return self.max_json_bytes, "--image-max-json-mb"
        return self.form_bytes, "--image-max-form-mb"


DEFAULT_LIMITS = ImageLimits()


def limits_of(request: Request) -> ImageLimits:
    """The server's limits (`init_state` puts them on the app state); the defaults before."""
    limits = getattr(request.app.state, "image_limits", None)
    return limits if isinstance(limits, ImageLimits) else DEFAULT_LIMITS


def size_text(num_bytes: int) -> str:
    """`1048576` -> `1 MiB`; `1536` -> `1536 bytes`."""
    if num_bytes >= MiB:
        return f"{num_bytes / MiB:g} MiB"
    return f"{num_bytes} bytes"


class BodyTooLargeError(HTTPException):
    """The body passed its limit while it was read. An `HTTPException`, so that FastAPI's
    body reading lets it through unchanged (it turns anything else into a 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)
        self.message = message


RouteHandler = Callable[[Request], Coroutine[Any, Any, Response]]


def guard_route(handler: RouteHandler, body: BodyKind | None) -> RouteHandler:
    """`handler` (a FastAPI route's) behind the checks that come before any work: no query
    parameters; the body within its limit (when `body` names one), and no JSON key twice;
    and the errors of reading the body (pydantic's validation errors, FastAPI's own 400)
    answered from the error table, in short."""

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
        except RequestValidationError as error:
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
    """The body's `Content-Length`; -1 when it has none (chunked) or an unreadable one
    (the server in front refuses those; the bytes are counted either way)."""
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
    """Starlette's request, whose JSON refuses a key given twice instead of keeping the last
    (FastAPI parses the body with `request.json()`)."""

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
