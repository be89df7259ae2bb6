"""A small client of the OpenAI Images API as `vllm serve <model> --task image` serves it.

Standard library only (ComfyUI ships neither `openai` nor `requests`): `urllib.request` for
HTTP (so `HTTP(S)_PROXY`/`NO_PROXY` apply as for any urllib client), the edit's
multipart/form-data body built by hand. A request can be cancelled while it waits: the
connection is closed, the server sees the client leave and withdraws the request (it stops at
the next denoising step), and the waiting caller gets `Cancelled` at once.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
SERVER_URL_ENV_VAR = "COMFYUI_VLLM_IMAGES_URL"
"""Names the server that new nodes point at and whose models the nodes' `model` list offers.
Not a `VLLM_` name: vLLM warns of every `VLLM_` variable it does not know in its own
environment, and ComfyUI and vLLM are often started from one shell."""
DEFAULT_TIMEOUT_S = 3600.0
"""Seconds to wait for an answer: a diffusion model on a CPU can take many minutes."""
API_KEY_ENV_VARS = ("VLLM_API_KEY", "OPENAI_API_KEY")
"""Read, in this order, when no key is given: vLLM's own variable first, so that a real OpenAI
key in the environment goes to a vLLM server only when nothing else is set."""
MAX_IMAGES_PER_REQUEST = 10
"""The API's cap on `n`."""
UINT64_MODULUS = 2**64
INT64_MAX = 2**63 - 1
POLL_INTERVAL_S = 0.2
ABORT_GRACE_S = 5.0

FieldValue = str | int | float | list[dict[str, str | float]]
"""A request field: text, a number, or a list of objects (`lora`)."""
Fields = Mapping[str, FieldValue | None]


@dataclass(frozen=True)
class ServedModel:
    """One card of `GET /v1/models`: a base model (no parent) or a LoRA adapter, whose
    `parent` is the base model it adapts (vLLM's `ModelCard`)."""

    name: str
    parent: str | None = None


class ServerError(RuntimeError):
    """The server refused or failed the request; the text is the server's own message."""

    def __init__(self, message: str, status: int | None = None, url: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.url = url


class Cancelled(Exception):  # noqa: N818  (not an error: the user asked for it)
    """The request was withdrawn because `should_stop` said so."""


def request_seed(seed: int) -> int:
    """ComfyUI's seed (0 to 2**64 - 1) as the API's int64 `seed`: two's complement.

    A bijection from the 64-bit unsigned range onto int64, the identity below 2**63. The
    server seeds its generator with `seed & (2**64 - 1)`, which undoes it: ComfyUI's seed `s`
    draws the image that any client's request with seed `s` (or `s - 2**64`) draws. Any other
    int wraps modulo 2**64 first, so every value maps somewhere, the same way every time.
    """
    unsigned = seed % UINT64_MODULUS
    return unsigned - UINT64_MODULUS if unsigned > INT64_MAX else unsigned


def resolve_api_key(api_key: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The key to send: the given one, else the first of `API_KEY_ENV_VARS` that is set."""
    if api_key and api_key.strip():
        return api_key.strip()
    environ = os.environ if environ is None else environ
    for name in API_KEY_ENV_VARS:
        value = environ.get(name, "").strip()
        if value:
            return value
    return ""


def default_server_url(environ: Mapping[str, str] | None = None) -> str:
    """`$COMFYUI_VLLM_IMAGES_URL`, else `http://127.0.0.1:8000` (`vllm serve`'s own default)."""
    environ = os.environ if environ is None else environ
    return environ.get(SERVER_URL_ENV_VAR, "").strip() or DEFAULT_SERVER_URL


def normalize_base_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` are one server."""
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError(
            "server_url is empty: give the vLLM server's URL, e.g. http://127.0.0.1:8000"
        )
    if "://" not in url:
        url = f"http://{url}"
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


class ImagesClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout_s = timeout_s
        self.should_stop = should_stop

    def models(self) -> list[ServedModel]:
        """`GET /v1/models`: the served models in the server's order (vLLM lists the base
        model first, then its LoRA adapters)."""
        answer = self._request("/v1/models")
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise ServerError(f"The server answered /v1/models without a list: {answer!r:.300}")
        return [
            ServedModel(str(card["id"]), str(card["parent"]) if card.get("parent") else None)
            for card in data
            if isinstance(card, dict) and card.get("id")
        ]

    def generate(self, fields: Fields) -> list[bytes]:
        """`POST /v1/images/generations`; the images' encoded bytes, in order."""
        body = json.dumps(_present(fields)).encode()
        return self._images("/v1/images/generations", body, "application/json")

    def edit(self, fields: Fields, image: bytes, mask: bytes | None = None) -> list[bytes]:
        """`POST /v1/images/edits` with a PNG `image` and an optional PNG `mask` (its
        transparent pixels are the ones to edit)."""
        files = [("image", "image.png", image)]
        if mask is not None:
            files.append(("mask", "mask.png", mask))
        body, content_type = multipart_body(_present(fields), files)
        return self._images("/v1/images/edits", body, content_type)

    def _images(self, path: str, body: bytes, content_type: str) -> list[bytes]:
        answer = self._request(path, body, content_type)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not data:
            raise ServerError(f"The server answered without images: {answer!r:.300}")
        images = []
        for item in data:
            encoded = item.get("b64_json") if isinstance(item, dict) else None
            if not isinstance(encoded, str):
                raise ServerError("The server answered an image without b64_json.")
            images.append(base64.b64decode(encoded))
        return images

    def _request(self, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        """POST `body` to `path`, or GET `path` when there is no body; the answer's JSON."""
        url = self.base_url + path
        headers = {"Accept": "application/json", "User-Agent": "comfyui-vllm-images"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        method = "GET" if body is None else "POST"
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        connections: list[http.client.HTTPConnection] = []
        opener = urllib.request.build_opener(
            _TrackingHTTPHandler(connections), _TrackingHTTPSHandler(connections)
        )

        def send() -> Any:
            try:
                with opener.open(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                raise ServerError(_error_message(error), error.code, url) from None
            except urllib.error.URLError as error:
                raise ServerError(
                    f"Cannot reach the vLLM server at {self.base_url}: {error.reason}", url=url
                ) from None
            except TimeoutError:  # socket.timeout too
                raise ServerError(
                    f"The vLLM server at {self.base_url} did not answer within "
                    f"{self.timeout_s:.0f} s.",
                    url=url,
                ) from None
            except (OSError, http.client.HTTPException, ValueError) as error:
                raise ServerError(
                    f"The request to {url} failed: {error.__class__.__name__}: {error}", url=url
                ) from None

        if self.should_stop is None:
            return send()
        return _run_cancellable(send, self.should_stop, connections)


def multipart_body(
    fields: Mapping[str, FieldValue], files: list[tuple[str, str, bytes]]
) -> tuple[bytes, str]:
    """A multipart/form-data body (text fields, then PNG files) and its Content-Type. A list
    (`lora`) is sent as its JSON text, as the server reads it in a form."""
    boundary = f"----comfyui-vllm-images-{uuid.uuid4().hex}"
    lines: list[bytes] = []
    for name, value in fields.items():
        text = json.dumps(value) if isinstance(value, list) else str(value)
        lines += [
            f"--{boundary}".encode(),
            f'Content-Disposition: form-data; name="{name}"'.encode(),
            b"Content-Type: text/plain; charset=utf-8",
            b"",
            text.encode(),
        ]
    for name, filename, content in files:
        lines += [
            f"--{boundary}".encode(),
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode(),
            b"Content-Type: image/png",
            b"",
            content,
        ]
    lines += [f"--{boundary}--".encode(), b""]
    return b"\r\n".join(lines), f"multipart/form-data; boundary={boundary}"


def _present(fields: Fields) -> dict[str, FieldValue]:
    return {name: value for name, value in fields.items() if value is not None}


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's own message: OpenAI's `{"error": {"message"}}`, vLLM's
    `{"error": "Unauthorized"}`, a framework's `{"detail"}`, or the text as sent."""
    try:
        text = error.read().decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    message = text or f"HTTP {error.code} {error.reason}"
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        detail = answer.get("error", answer.get("detail"))
        if isinstance(detail, dict) and detail.get("message"):
            message = str(detail["message"])
        elif isinstance(detail, str) and detail:
            message = detail
    if error.code == 401:
        message += (
            " (the server runs with --api-key: set the node's api_key, or VLLM_API_KEY or "
            "OPENAI_API_KEY in ComfyUI's environment)"
        )
    return message


def _run_cancellable(
    send: Callable[[], Any],
    should_stop: Callable[[], bool],
    connections: list[http.client.HTTPConnection],
) -> Any:
    """Run `send` on a worker thread; when `should_stop()` turns true, close its connection
    (the server drops a request whose client left) and raise `Cancelled`."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = send()
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=work, name="vllm-images-request", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_INTERVAL_S)
        if worker.is_alive() and should_stop():
            # Closing the socket wakes the worker; retried briefly in case the worker had
            # not connected yet when the stop came.
            deadline = time.monotonic() + ABORT_GRACE_S
            while worker.is_alive() and time.monotonic() < deadline:
                for connection in list(connections):
                    _abort(connection)
                worker.join(0.05)
            raise Cancelled("The request was cancelled; the server withdraws it.")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _abort(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _tracking(
    http_class: Callable[..., http.client.HTTPConnection],
    connections: list[http.client.HTTPConnection],
) -> Callable[..., http.client.HTTPConnection]:
    def connect(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        connection = http_class(host, **kwargs)
        connections.append(connection)
        return connection

    return connect


class _TrackingHTTPHandler(urllib.request.HTTPHandler):
    """urllib's handler, remembering its connection so that another thread can close it."""

    def __init__(self, connections: list[http.client.HTTPConnection]) -> None:
        super().__init__()
        self._connections = connections

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_tracking(http_class, self._connections), req, **kwargs)


class _TrackingHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connections: list[http.client.HTTPConnection]) -> None:
        super().__init__()
        self._connections = connections

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_tracking(http_class, self._connections), req, **kwargs)
