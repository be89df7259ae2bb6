"""The HTTP protocol `vllm serve --task image` serves with: uvicorn's httptools protocol (the one
uvicorn picks, and so vLLM's server runs: httptools comes with vLLM) with what it lacks against
slow and oversized request heads.

- **A deadline for each request head** (`--image-header-timeout`), counted from the
  connection's opening or from its previous answer to the head's last byte. A client that
  sends nothing, part of a head, or a head a byte at a time is closed at it, after a 408 if
  part of a head came. uvicorn's own keep-alive timer closes only a connection idle after an
  answer, and any byte stops it; it has no timer before a connection's first request.
- **vLLM's limits on a head**, `--h11-max-incomplete-event-size` (bytes of a head not yet
  complete, as h11 counts them) and `--h11-max-header-count`: vLLM hands both to uvicorn, but
  only uvicorn's h11 protocol reads the first, and nothing reads the second. Past either, a
  431 and the connection is closed.

uvicorn takes the class through its `http` option (`uvicorn.Config(http=...)`), which vLLM's
`serve_http` passes on: no code of uvicorn or vLLM is changed. A request's body has its own
deadline, on the image routes (`images/request_guard.py`, `--image-body-timeout`).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from vllm.entrypoints.launchers.utils.constants import (
    H11_MAX_HEADER_COUNT_DEFAULT,
    H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT,
)

from vllm_omni_images.images.errors import HeadTooLargeError, ReadTimeoutError, error_response


class HeadLimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request head and vLLM's head
    limits (this module's docstring). Built by `head_limited_protocol`."""

    head_timeout_s: float | None = None
    """Seconds a request head may take; `None`: no deadline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        incomplete = self.config.h11_max_incomplete_event_size
        headers = getattr(self.config, "h11_max_header_count", None)  # set by vLLM's serve_http
        self.max_head_bytes: int = incomplete or H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT
        self.max_header_count: int = headers or H11_MAX_HEADER_COUNT_DEFAULT
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None
        """Bytes read since the current request head began; `None` outside a head."""
        self._header_count = 0

    # The connection waits for a request head: at its opening, and after each answer.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle, no pipelined request to start
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    # httptools' callbacks while it reads a head.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_header_count:
            self._refuse(
                HeadTooLargeError(
                    f"The request has more than {self.max_header_count} headers, the most "
                    "this server reads (--h11-max-header-count)."
                )
            )
            raise HeadRefusedError  # stops httptools reading the rest
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._cancel_head_deadline()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_bytes is None or self.transport.is_closing():
            return
        self._head_bytes += len(data)  # a head still incomplete after this read
        if self._head_bytes > self.max_head_bytes:
            self._refuse(
                HeadTooLargeError(
                    f"The request head is larger than {self.max_head_bytes} bytes, the most "
                    "this server reads (--h11-max-incomplete-event-size)."
                )
            )

    def send_400_response(self, msg: str) -> None:
        if not self.transport.is_closing():  # not after this class's own answer
            super().send_400_response(msg)

    # The head deadline.

    def _await_head(self) -> None:
        self._cancel_head_deadline()
        if self.head_timeout_s is not None:
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self._head_bytes is None:  # nothing of a request came: close, as keep-alive does
            self.transport.close()
            return
        self._refuse(
            ReadTimeoutError(
                f"The request head (request line and headers) did not all arrive within "
                f"{self.head_timeout_s:g} s, the most this server waits for one "
                "(--image-header-timeout)."
            )
        )

    def _refuse(self, error: Exception) -> None:
        """Answer `error` from the error table, in OpenAI's shape, and close the connection."""
        response = error_response(error)
        status = HTTPStatus(response.error.code)
        body = json.dumps(response.model_dump()).encode()
        # A slow client is routine (and a flood of them must not flood the log); a head over
        # the limits is logged as uvicorn logs a request it cannot parse.
        log = self.logger.debug if isinstance(error, ReadTimeoutError) else self.logger.warning
        log("%s %s", status.value, response.error.message)
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
        head += [b"%s: %s\r\n" % header for header in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            f"content-length: {len(body)}\r\n".encode(),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


class HeadRefusedError(Exception):
    """Raised from an httptools callback after `HeadLimitedHttpProtocol._refuse`: httptools stops
    reading, and uvicorn's answer to the parse error is not sent (the connection is closing)."""


def head_limited_protocol(head_timeout_s: float | None) -> type[HeadLimitedHttpProtocol]:
    """The protocol class for uvicorn's `http` option, with `head_timeout_s` (`None`: none)."""

    class Protocol(HeadLimitedHttpProtocol):
        pass

    Protocol.head_timeout_s = head_timeout_s
    return Protocol
