"""Nothing a client sends is dropped unread, used as a path, fetched without the operator's
leave, or echoed whole into a response or a log: through the HTTP API of the in-process app
on the real tiny engine."""

from __future__ import annotations

import base64
import http.server
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.images.file_store import NAME_PATTERN

from ..support.images import FAST, png
from .conftest import AppFactory
from .helpers import assert_openai_error, generate, http_client

SERVING_LOGGER = "vllm_omni_images.images.serving"


def found(folder: Path, pattern: str) -> list[Path]:
    return list(folder.rglob(pattern))


def image_file(name: str = "in.png") -> dict[str, tuple[str, bytes, str]]:
    return {"image": (name, png(), "image/png")}


# --- nothing is dropped unread ---------------------------------------------------------------


@pytest.mark.parametrize("typo", ["num_inference_step", "guidance", "temperature"])
async def test_an_unknown_field_is_a_400_naming_it_on_every_route(
    client: httpx.AsyncClient, typo: str
) -> None:
    response = await generate(client, **{typo: 3}, **FAST)
    error = assert_openai_error(response, 400, typo)
    assert "no such field" in error["message"]
    for path, data in [
        ("/v1/images/edits", {"prompt": "p", typo: "3"}),
        ("/v1/images/variations", {typo: "3"}),
    ]:
        response = await client.post(path, data=data, files=image_file())
        error = assert_openai_error(response, 400, typo)
        assert typo in error["message"]


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("/v1/images/generations", {"json": {"prompt": "p", **FAST}}),
        ("/v1/images/edits", {"data": {"prompt": "p"}, "files": image_file()}),
        ("/v1/images/variations", {"files": image_file()}),
    ],
)
async def test_a_query_parameter_is_a_400_naming_it_before_the_body_is_read(
    client: httpx.AsyncClient, path: str, kwargs: dict
) -> None:
    response = await client.post(f"{path}?n=3", **kwargs)
    error = assert_openai_error(response, 400, "n")
    assert "Query parameters" in error["message"]
    response = await client.post(f"{path}?num_inference_steps=2&guidance=1", **kwargs)
    error = assert_openai_error(response, 400, "num_inference_steps")
    assert "guidance" in error["message"]


async def test_a_field_sent_twice_is_a_400_not_a_silent_choice(
    client: httpx.AsyncClient,
) -> None:
    for body, param in [
        (b'{"prompt": "a fox", "prompt": "a dog"}', "prompt"),
        (b'{"prompt": "p", "svg": {"a": 1, "a": 2}}', "a"),  # at any depth
    ]:
        response = await client.post(
            "/v1/images/generations", content=body, headers={"Content-Type": "application/json"}
        )
        error = assert_openai_error(response, 400, param)
        assert "twice" in error["message"]
    twice = {"prompt": ["a fox", "a dog"]}
    response = await client.post("/v1/images/edits", data=twice, files=image_file())
    assert_openai_error(response, 400, "prompt")
    masks = [
        ("image", ("in.png", png(), "image/png")),
        ("mask", ("m.png", png(), "image/png")),
        ("mask_image", ("m.png", png(), "image/png")),
    ]
    response = await client.post("/v1/images/edits", data={"prompt": "p"}, files=masks)
    assert_openai_error(response, 400, "mask")


async def test_a_variation_has_no_mask(client: httpx.AsyncClient) -> None:
    files = {**image_file(), "mask": ("m.png", png(), "image/png")}
    assert_openai_error(await client.post("/v1/images/variations", files=files), 400, "mask")


# --- what error messages echo ------------------------------------------------------------


async def test_a_bad_size_is_a_short_readable_message(client: httpx.AsyncClient) -> None:
    error = assert_openai_error(await generate(client, size="banana"), 400, "size")
    assert error["message"] == (
        "size must be 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or 'auto' (got 'banana')"
    )


async def test_long_values_are_echoed_only_in_part(client: httpx.AsyncClient) -> None:
    marker = "do-not-echo-"
    cases: list[tuple[dict[str, object], str]] = [
        ({"size": marker * 10_000}, "size"),
        ({"n": marker * 10_000}, "n"),
        ({"prompt": ["x"] * 10_000}, "prompt"),
        ({marker * 1000: 1}, marker[:20]),
    ]
    for body, param in cases:
        response = await client.post("/v1/images/generations", json={"prompt": "p", **body})
        error = assert_openai_error(response, 400)
        assert param in error["param"]
        assert len(error["message"]) < 400 and len(error["param"]) < 100
    model = await generate(client, model=marker * 10_000)
    error = assert_openai_error(model, 404, "model")
    assert len(error["message"]) < 200
    data_url = "data:image/png;base64," + base64.b64encode(png()).decode() + "!" * 10_000
    response = await client.post("/v1/images/edits", data={"prompt": "p", "image": data_url})
    error = assert_openai_error(response, 400, "image")
    assert len(error["message"]) < 200
    edit = await client.post(
        "/v1/images/edits", data={"prompt": "p", "n": marker * 10_000}, files=image_file()
    )
    error = assert_openai_error(edit, 400, "n")
    assert error["message"].count(marker) <= 4


# --- nothing a client sends is a path ----------------------------------------------------


@pytest.mark.parametrize(
    "model", ["../../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "tiny-qwen-image/.."]
)
async def test_model_is_only_compared_with_the_served_names(
    client: httpx.AsyncClient, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_path_lookups(*args: object) -> None:
        raise AssertionError("a model path was resolved at request time")

    monkeypatch.setattr("vllm_omni_images.tiny_model.resolve_model_path", no_path_lookups)
    monkeypatch.setattr("vllm_omni_images.server.launcher.resolve_model_path", no_path_lookups)
    error = assert_openai_error(await generate(client, model=model, **FAST), 404, "model")
    assert "root:" not in error["message"]
    assert (await generate(client, model="tiny-qwen-image", **FAST)).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/images/files/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/images/files/..%252F..%252Fetc%252Fpasswd",
        "/images/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/images/files/..%5C..%5Cetc%5Cpasswd",
        "/images/files/%2Fetc%2Fpasswd",
        "/images/files//etc/passwd",
        "/images/files/../../etc/passwd",
        "/images/files/~root%2F.bashrc",
    ],
)
async def test_encoded_traversal_and_absolute_paths_are_404(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert_openai_error(response, 404)  # OpenAI's shape, also for a name with a `/`
    assert "root:" not in response.text


async def test_the_store_serves_only_the_files_it_wrote_never_a_symlink(
    make_app: AppFactory, tiny_runner: DiffusersRunner, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    app = await make_app(tiny_runner, ["--image-store-dir", str(store)])
    planted = "A" * 32 + ".png"
    (store / planted).symlink_to(secret)
    async with http_client(app) as http:
        assert (await http.get(f"/images/files/{planted}")).status_code == 404
        # An upload's filename is never a path: what the store holds are its own names.
        response = await http.post(
            "/v1/images/edits",
            data={"prompt": "p", "response_format": "url", "num_inference_steps": "2"},
            files=image_file("../../escaped.png"),
        )
        assert response.status_code == 200, response.text
        written = sorted(os.listdir(store))
        assert all(NAME_PATTERN.match(name) for name in written)
        assert set(written) - {planted}
        assert not found(tmp_path, "escaped*")
        url = response.json()["data"][0]["url"]
        assert (await http.get(url.removeprefix("http://test"))).status_code == 200
        assert (await http.get(url.removeprefix("http://test") + "?x=1")).status_code == 400


# --- input images only from the request, unless the operator allows a host ---------------


class ImageHost:
    """A local HTTP server: a stand-in for a host on the internet, counting what it served."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.bodies: dict[str, bytes] = {
            "/fox.png": png(),
            "/big.png": png() + b"\0" * (2 * 1024 * 1024),
            "/bomb.png": _png_header(9000, 9000),
        }
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests.append(self.path)
                body = host.bodies.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    thread = threading.Thread(target=host.server.serve_forever, daemon=True)
    thread.start()
    yield host
    host.server.shutdown()
    host.server.server_close()


@pytest.mark.parametrize("parameter", ["image", "mask"])
async def test_no_url_is_fetched_without_allowed_hosts_and_no_file_is_read(
    client: httpx.AsyncClient, image_host: ImageHost, parameter: str
) -> None:
    for url in (
        f"{image_host.url}/fox.png",
        "http://localhost/fox.png",
        "file:///etc/passwd",
        "file://localhost/etc/passwd",
        "/etc/passwd",
        "ftp://127.0.0.1/fox.png",
    ):
        data = {"prompt": "p", parameter: url}
        files = image_file() if parameter == "mask" else {}
        response = await client.post("/v1/images/edits", data=data, files=files)
        error = assert_openai_error(response, 400, parameter)
        assert "root:" not in error["message"]
    assert image_host.requests == []


async def test_an_allowed_host_is_held_to_the_input_limits(
    make_app: AppFactory, tiny_runner: DiffusersRunner, image_host: ImageHost
) -> None:
    flags = ["--allowed-media-domains", "127.0.0.1", "--image-max-input-mb", "1"]
    async with http_client(await make_app(tiny_runner, flags)) as http:

        async def edit(path: str) -> httpx.Response:
            data = {"prompt": "p", "image": f"{image_host.url}{path}", **FAST}
            return await http.post("/v1/images/edits", data={k: str(v) for k, v in data.items()})

        assert (await edit("/fox.png")).status_code == 200
        assert_openai_error(await edit("/big.png"), 413)
        error = assert_openai_error(await edit("/bomb.png"), 400, "image")
        assert "9000x9000" in error["message"]
        assert_openai_error(await edit("/missing.png"), 400, "image")  # the host's 404


# --- logs --------------------------------------------------------------------------------


async def test_a_request_id_or_user_cannot_forge_a_log_line(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "abc\nINFO 01-01 00:00:00 [serving.py:1] Image request admin: ok\x1b[2K\r"
    with caplog.at_level(logging.INFO, logger=SERVING_LOGGER):
        response = await client.post(
            "/v1/images/generations",
            json={"prompt": "the secret prompt", "user": f"eve\r\n{forged}", **FAST},
            headers={"X-Request-Id": forged + "x" * 10_000},
        )
        assert response.status_code == 200, response.text
    lines = [record.getMessage() for record in caplog.records if record.name == SERVING_LOGGER]
    assert lines
    for line in lines:
        assert not re.search(r"[\x00-\x1f\x7f]", line), line
        assert len(line) < 600
        assert "the secret prompt" not in line
    assert any("abc\\nINFO" in line for line in lines)  # escaped, still readable


async def test_the_api_key_and_payloads_are_not_logged(
    make_app: AppFactory, tiny_runner: DiffusersRunner, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app(tiny_runner, ["--api-key", "sk-very-secret"])
    payload = base64.b64encode(png()).decode()
    with caplog.at_level(logging.DEBUG):
        async with http_client(app) as http:
            headers = {"Authorization": "Bearer sk-very-secret"}
            await http.post(
                "/v1/images/edits",
                data={"prompt": "p", "image": f"data:image/png;base64,{payload}", **FAST},
                headers=headers,
            )
            await http.post("/v1/images/generations", json={"prompt": "p"}, headers={})
            await generate(http, size="banana")
    text = caplog.text
    assert "sk-very-secret" not in text
    assert payload[:200] not in text
