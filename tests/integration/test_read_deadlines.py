"""Slow and oversized requests, sent on raw sockets to the app served as `vllm serve` serves it:
the launcher's `serve_image_app` (vLLM's `serve_http`, uvicorn, this package's HTTP protocol) on
a real socket in this event loop, with deadlines of 1 s set by flag so that each case takes
about a second. Without the deadlines each of these connections stayed open for good (issue 31:
past 300 s, and indefinitely with a byte every 5 s)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.server.launcher import serve_image_app

from .conftest import AppFactory
from .helpers import FAST, assert_openai_error, http_client

DEADLINE_S = 1.0
FLAGS = [
    *("--image-header-timeout", str(DEADLINE_S), "--image-body-timeout", str(DEADLINE_S)),
    *("--h11-max-incomplete-event-size", "16384", "--h11-max-header-count", "32"),
]
LATE_S = 10 * DEADLINE_S
"""Later than any answer to a deadline may come on a loaded machine."""

Address = tuple[str, int]


@pytest.fixture
async def address(make_app: AppFactory, tiny_runner: DiffusersRunner) -> AsyncIterator[Address]:
    app = await make_app(tiny_runner, FLAGS)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    serving = asyncio.create_task(serve_image_app(app, listener, app.state.args))
    try:
        await until(lambda: getattr(app.state, "server", None) is not None, timeout_s=ENGINE_WAIT_S)
        await until(lambda: app.state.server.started, "uvicorn", timeout_s=ENGINE_WAIT_S)
        yield listener.getsockname()
    finally:
        app.state.server.should_exit = True
        await (await serving)  # serve_http returns its shutdown, a no-op here
        listener.close()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # serve_http's, on the test session's loop
            loop.remove_signal_handler(sig)


async def until_closed(
    address: Address, sent: bytes, trickle: bytes = b"", every_s: float = 0.2
) -> tuple[bytes, float]:
    """Send `sent`, then `trickle` a byte each `every_s`; return what the server answered up to
    closing the connection, and the seconds from the connection to the close."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*address)
    opened = loop.time()

    async def send() -> None:
        writer.write(sent)
        for byte in trickle:
            await asyncio.sleep(every_s)
            writer.write(bytes([byte]))
        await writer.drain()

    sending = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(reader.read(), LATE_S)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()
    return answer, loop.time() - opened


def openai_error(answer: bytes, status: int) -> dict:
    """The error of a raw HTTP answer, checked: `status`, OpenAI's shape, the connection
    closed."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), answer[:200]
    headers = {name.lower(): value for name, _, value in (h.partition(": ") for h in lines[1:])}
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


HEAD = b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\n"


async def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(
    address: Address,
) -> None:
    answer, after_s = await until_closed(address, b"")
    assert answer == b""
    assert DEADLINE_S * 0.9 <= after_s < LATE_S


@pytest.mark.parametrize("trickle", [b"", b"X-Slow: " + b"a" * 1000], ids=["partial", "trickled"])
async def test_a_partial_or_trickled_head_is_a_408_at_the_head_deadline(
    address: Address, trickle: bytes
) -> None:
    """A byte every 0.2 s does not move the deadline: it counts from the head's start."""
    answer, after_s = await until_closed(address, HEAD, trickle)
    error = openai_error(answer, 408)
    assert "--image-header-timeout" in error["message"]
    assert DEADLINE_S * 0.9 <= after_s < LATE_S


async def test_a_kept_alive_connection_has_the_deadline_again_after_each_answer(
    address: Address,
) -> None:
    """The issue's "one byte every 5 s kept one alive indefinitely", at 5 bytes a second."""
    first = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
    second = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 100
    answer, after_s = await until_closed(address, first, second)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1 ") == 2  # the health answer, then the 408
    error = openai_error(answer[answer.rindex(b"HTTP/1.1 ") :], 408)
    assert "--image-header-timeout" in error["message"]
    assert DEADLINE_S * 0.9 <= after_s < LATE_S


@pytest.mark.parametrize("trickle", [b"", b"x" * 100], ids=["partial", "trickled"])
async def test_a_partial_or_trickled_body_is_a_408_at_the_body_deadline(
    address: Address, trickle: bytes
) -> None:
    """Content-Length 100 and 5 bytes sent (the issue's case), or a byte every 0.2 s."""
    head = HEAD + b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    answer, after_s = await until_closed(address, head + b'{"pro', trickle)
    error = openai_error(answer, 408)
    assert "--image-body-timeout" in error["message"]
    assert error["type"] == "TimeoutError"
    assert DEADLINE_S * 0.9 <= after_s < LATE_S


async def test_a_partial_edit_form_is_a_408_at_the_body_deadline(address: Address) -> None:
    head = (
        b"POST /v1/images/edits HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG'
    answer, after_s = await until_closed(address, head + part)
    error = openai_error(answer, 408)
    assert "--image-body-timeout" in error["message"]
    assert after_s < LATE_S


async def test_a_head_over_the_limits_is_a_431_before_it_ends(address: Address) -> None:
    """vLLM's --h11-max-incomplete-event-size and --h11-max-header-count, which uvicorn's
    httptools protocol does not read: a head of 100 MB was read whole before (issue 31)."""
    too_long = HEAD + b"X-Big: " + b"a" * 20_000  # more than 16384 bytes, and no end
    error = openai_error((await until_closed(address, too_long))[0], 431)
    assert "--h11-max-incomplete-event-size" in error["message"]
    too_many = HEAD + b"".join(b"X-%d: 1\r\n" % index for index in range(40)) + b"\r\n"
    error = openai_error((await until_closed(address, too_many))[0], 431)
    assert "--h11-max-header-count" in error["message"]


async def test_prompt_clients_are_served_on_the_same_connection(address: Address) -> None:
    """The deadlines leave alone a client that sends its requests at once: a generation (the
    body deadline ends with its body, not with its answer), then more requests on the same
    kept-alive connection, with pauses under the head deadline between them."""
    host, port = address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=60) as client:
        body = {"prompt": "fox", **FAST, "seed": 1}
        response = await client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        for _ in range(3):
            await asyncio.sleep(DEADLINE_S / 2)
            assert (await client.get("/health")).status_code == 200


# --- the server's own reads: an edit image's URL on a host that trickles -------------------


@pytest.fixture
async def trickling_host() -> AsyncIterator[str]:
    """A host that answers any request with a PNG's head and then a byte every 0.2 s."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):
                writer.write(b"\x89")
                await writer.drain()
                await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    async with server:
        yield f"http://{host}:{port}"
        server.close()


async def test_an_image_url_that_trickles_is_refused_at_one_deadline_with_its_reason(
    make_app: AppFactory,
    tiny_runner: DiffusersRunner,
    trickling_host: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: vLLM's three tries, 113 s, then "image could not be fetched:  (parameter=image)"."""
    from vllm import envs

    monkeypatch.setattr(envs, "VLLM_IMAGE_FETCH_TIMEOUT", 1, raising=False)
    app = await make_app(tiny_runner, ["--allowed-media-domains", "127.0.0.1"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http_client(app) as http:
        data = {"prompt": "p", "image": f"{trickling_host}/fox.png"}
        response = await http.post("/v1/images/edits", data=data)
    error = assert_openai_error(response, 400, "image")
    assert "did not arrive within 1 s" in error["message"]
    assert "VLLM_IMAGE_FETCH_TIMEOUT" in error["message"]
    assert loop.time() - started < LATE_S
