"""Issue 31's slow-network cases: clients that send their request slowly or never finish it
(raw sockets), and an edit whose image URL trickles in at one byte a second (a local HTTP
server; the image server must allow it with `--allowed-media-domains 127.0.0.1`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from testing import adversarial_inputs as inputs
from testing.adversarial_cases import Row, Target, row, send

TRICKLE_EVERY_S = 5.0


def _headers(target: Target, content_length: int) -> bytes:
    host = urlsplit(target.base_url).netloc
    lines = [
        "POST /v1/images/generations HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {content_length}",
        *(f"{name}: {value}" for name, value in target.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _slow_client_plans(target: Target) -> dict[str, tuple[bytes, bytes]]:
    """label -> (what is sent at once, what is then sent one byte every `TRICKLE_EVERY_S`)."""
    headers = _headers(target, 100)
    return {
        "nothing sent": (b"", b""),
        "partial headers": (headers[:40], b""),  # the request line and part of `Host:`
        "partial body (Content-Length 100, 5 bytes sent)": (headers + b'{"pro', b""),
        f"one header byte every {TRICKLE_EVERY_S:.0f} s": (b"", headers),
    }


def _hold(target: Target, label: str, first: bytes, pending: bytes) -> Row:
    """Open a connection, send `first`, then `pending` a byte at a time, and wait (at most
    `slow_client_cap_s`) for the server to answer or close the connection."""
    address = urlsplit(target.base_url)
    start = time.monotonic()
    answer = b""
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(first)
        sock.settimeout(0.5)
        next_byte = start
        status = f"still open after {target.slow_client_cap_s:.0f} s"
        while time.monotonic() - start < target.slow_client_cap_s:
            if pending and time.monotonic() >= next_byte:
                try:
                    sock.sendall(pending[:1])
                except OSError:
                    status = "closed by the server"
                    break
                pending, next_byte = pending[1:], next_byte + TRICKLE_EVERY_S
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                status = "reset by the server"
                break
            if not data:
                status = "closed by the server"
                break
            answer += data
    seconds = round(time.monotonic() - start, 1)
    excerpt = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    if answer and status.startswith("still"):
        status = f"answered, {status}"
    return Row(f"slow_clients:{label}", 4, f"a connection: {label}", status, excerpt, seconds)


def slow_clients(target: Target) -> list[Row]:
    """The four slow clients at once (each waits up to `slow_client_cap_s`)."""
    plans = _slow_client_plans(target)
    with ThreadPoolExecutor(len(plans)) as pool:
        running = [pool.submit(_hold, target, label, *plan) for label, plan in plans.items()]
        return [held.result() for held in running]


@contextmanager
def trickling_image_server(every_s: float = 1.0) -> Iterator[tuple[str, list[float]]]:
    """A local HTTP server whose `/slow.png` sends a real PNG one byte every `every_s`; yields
    its URL and the times each fetch of it began."""
    image = inputs.plain_png(64, 64)
    fetches: list[float] = []
    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            for index in range(len(image)):
                if stop.wait(every_s):
                    return
                try:
                    self.wfile.write(image[index : index + 1])
                    self.wfile.flush()
                except OSError:  # the fetcher gave up
                    return

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/slow.png", fetches
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def trickling_media_url(target: Target) -> list[Row]:
    with trickling_image_server() as (url, fetches):
        start = time.monotonic()
        data = {"prompt": "x", "image": url, "num_inference_steps": "2"}
        result = send(target, "POST", "/v1/images/edits", data=data)  # a urlencoded form
        offsets = ", ".join(f"{fetch - start:.0f}" for fetch in fetches)
    notes = f"the URL was fetched {len(fetches)} time(s), at {offsets} s"
    sent = "edit whose image URL sends 1 byte/s (allowed domain)"
    return [row("trickling_media_url", 7, sent, result, notes)]
