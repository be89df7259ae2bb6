"""The limits a request is held to before any work is done for it (`--image-max-*`), through
the HTTP API of the in-process app on the real tiny engine.

The body limits are proven by what the server read: a body is sent through an async generator
that counts the chunks the server asked for, and a refused body must stop far short of its
end (or, with a `Content-Length` above the limit, before its first chunk).
"""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.images.encoding import decode_image_base64

from ..support.engines import ObservedRunner
from ..support.images import png
from .conftest import AppFactory
from .helpers import FAST, assert_openai_error, generate, http_client

MiB = 1024 * 1024
CHUNK = 64 * 1024
HUGE = 400 * MiB  # the body: read in full (3.4 s) before it was refused, as a 400


class CountedBody:
    """A request body of `total` bytes, sent in chunks as the server asks for them."""

    def __init__(self, total: int = HUGE, first: bytes = b"") -> None:
        self.total = total
        self.first = first
        self.chunks_read = 0

    @property
    def all_chunks(self) -> int:
        return -(-self.total // CHUNK)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        while sent < self.total:
            chunk = (self.first if sent == 0 and self.first else b"x" * CHUNK)[:CHUNK]
            self.chunks_read += 1
            sent += len(chunk)
            yield chunk


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width`x`height` but holds no pixel data: reading its header is
    cheap; decoding it fails. A server that decoded before checking the size would answer
    "not readable", not "too many pixels"."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


async def app_with(
    make_app: AppFactory, tiny_runner: DiffusersRunner, flags: Sequence[str] = ()
) -> tuple[FastAPI, ObservedRunner]:
    engine = ObservedRunner(tiny_runner)
    return await make_app(engine, flags), engine


# --- the body, before it is read ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/images/generations", "application/json"),
        ("/v1/images/edits", "multipart/form-data; boundary=x"),
        ("/v1/images/variations", "multipart/form-data; boundary=x"),
    ],
)
async def test_a_declared_length_over_the_limit_is_a_413_before_a_byte_is_read(
    client: httpx.AsyncClient, path: str, content_type: str
) -> None:
    body = CountedBody()
    response = await client.post(
        path,
        content=body,
        headers={"Content-Type": content_type, "Content-Length": str(HUGE)},
    )
    error = assert_openai_error(response, 413)
    assert "--image-max-" in error["message"]
    assert body.chunks_read == 0


FILE_PART = (
    b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)


@pytest.mark.parametrize("declared", [None, "10"])  # chunked; a Content-Length that lies
@pytest.mark.parametrize(
    ("path", "content_type", "first", "flags", "limit"),
    [
        ("/v1/images/generations", "application/json", b'{"prompt": "', [], 1),
        # a valid form whose image never ends; a text field that never ends
        ("/v1/images/edits", "multipart/form-data; boundary=x", FILE_PART, ["2"], 2),
        ("/v1/images/variations", "application/x-www-form-urlencoded", b"image=", ["2"], 2),
    ],
)
async def test_a_body_without_an_honest_length_stops_being_read_at_the_limit(
    make_app: AppFactory,
    tiny_runner: DiffusersRunner,
    path: str,
    content_type: str,
    first: bytes,
    flags: list[str],
    limit: int,
    declared: str | None,
) -> None:
    flags = ["--image-max-form-mb", *flags] if flags else []
    app, engine = await app_with(make_app, tiny_runner, flags)
    limit_bytes = limit * MiB
    body = CountedBody(first=first)
    headers = {"Content-Type": content_type}
    if declared is not None:
        headers["Content-Length"] = declared
    async with http_client(app) as http:
        response = await http.post(path, content=body, headers=headers)
        assert_openai_error(response, 413)
        # Refused as soon as the bytes read passed the limit: the rest was never read.
        assert body.chunks_read <= limit_bytes // CHUNK + 2 < body.all_chunks
        assert engine.batches == []
        assert (await generate(http, **FAST)).status_code == 200  # and serving goes on


async def test_the_body_limits_are_flags(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    app, _ = await app_with(make_app, tiny_runner, ["--image-max-json-mb", "0.01"])
    async with http_client(app) as http:
        response = await generate(http, negative_prompt="x" * 20_000, **FAST)
        error = assert_openai_error(response, 413)
        assert "10485 bytes" in error["message"] and "--image-max-json-mb" in error["message"]
        assert (await generate(http, negative_prompt="x" * 2_000, **FAST)).status_code == 200


# --- what a generation may ask for ---------------------------------------------------------


async def test_pixels_per_image_and_per_request_are_refused_before_the_engine(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    app, engine = await app_with(make_app, tiny_runner)
    async with http_client(app) as http:
        # Defaults: 2048x2048 per image (the model's), four of them per request.
        assert_openai_error(await generate(http, size="2064x2048"), 400, "size")
        assert_openai_error(await generate(http, size="99999x99999"), 400, "size")
        error = assert_openai_error(await generate(http, size="2048x2048", n=5), 400, "n")
        assert "--image-max-request-pixels" in error["message"]
    assert engine.batches == []

    flags = ["--image-max-pixels", "64x64", "--image-max-request-pixels", "8192"]
    app, engine = await app_with(make_app, tiny_runner, flags)
    async with http_client(app) as http:
        assert_openai_error(await generate(http, size="128x64"), 400, "size")
        assert_openai_error(await generate(http, size="64x64", n=3), 400, "n")
        assert engine.batches == []
        response = await generate(http, **FAST, n=2)
        assert response.status_code == 200, response.text
    assert engine.batches == [2]


async def test_the_prompt_limit_is_a_flag_and_the_prompt_is_not_echoed(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    app, engine = await app_with(make_app, tiny_runner, ["--image-max-prompt-chars", "100"])
    async with http_client(app) as http:
        for field in ("prompt", "negative_prompt"):
            response = await generate(http, **{field: "secret-" * 20}, **FAST)
            error = assert_openai_error(response, 400, field)
            assert "140 characters" in error["message"] and "secret" not in error["message"]
        edit = await http.post(
            "/v1/images/edits",
            data={"prompt": "y" * 101},
            files={"image": ("in.png", png(), "image/png")},
        )
        assert_openai_error(edit, 400, "prompt")
        assert (await generate(http, prompt="z" * 100, **FAST)).status_code == 200
    assert engine.batches == [1]


async def test_the_default_prompt_limit_is_32000_characters(client: httpx.AsyncClient) -> None:
    assert_openai_error(await generate(client, prompt="x" * 32_001), 400, "prompt")


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "p", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deep nesting
        b'{"prompt": "p", "seed": ' + b"9" * 100_000 + b"}",  # a huge number
        b'{"prompt": "p", "n": 1e999}',
        b'{"prompt": "p", "guidance_scale": NaN}',
    ],
    ids=["deep-nesting", "huge-integer", "huge-float", "nan"],
)
async def test_hostile_json_is_a_400(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post(
        "/v1/images/generations", content=body, headers={"Content-Type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert len(error["message"]) < 600
    assert (await generate(client, **FAST)).status_code == 200


async def test_text_a_tokenizer_cannot_read_and_wrong_json_types_never_reach_the_engine(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    """The issue's `negative_prompt: "\\ud800"` was a 500 from the tokenizer (and failed the
    request batched beside it); `"stream": "yes"` streamed and `"n": "2"` made two images."""
    app, engine = await app_with(make_app, tiny_runner)
    async with http_client(app) as http:
        for field in ("prompt", "negative_prompt", "user", "safety_identifier", "model", "size"):
            body = {"prompt": "x", "size": "64x64", field: "a\ud800"}
            response = await http.post(
                "/v1/images/generations",
                content=json.dumps(body),  # "\\ud800": ASCII, valid JSON
                headers={"Content-Type": "application/json"},
            )
            error = assert_openai_error(response, 400, field)
            assert "lone surrogate" in error["message"]
        for field, value in (("stream", "yes"), ("n", "2"), ("seed", "1"), ("n", 2.0)):
            error = assert_openai_error(await generate(http, **{field: value}), 400, field)
            assert "valid" in error["message"]
        assert engine.batches == []
        ok = await generate(http, **FAST, guidance_scale=1, true_cfg_scale=1)  # ints as floats
        assert ok.status_code == 200, ok.text
    assert engine.batches == [1]


# --- edit inputs -----------------------------------------------------------------------------


async def test_edit_inputs_are_held_to_the_input_flags(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    flags = [
        "--image-max-input-images",
        "4",  # more than the engines edit at once: changes nothing (it can only lower it)
        "--image-max-input-mb",
        "0.01",
        "--image-max-input-pixels",
        "64x64",
    ]
    app, engine = await app_with(make_app, tiny_runner, flags)
    noisy = png(Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)))
    assert len(noisy) > 0.01 * MiB
    data_url = "data:image/png;base64," + base64.b64encode(noisy).decode()
    async with http_client(app) as http:

        async def edit(files: list | None = None, **data: str) -> httpx.Response:
            return await http.post(
                "/v1/images/edits", data={"prompt": "p", **data}, files=files or []
            )

        two = [("image[]", ("a.png", png(), "image/png"))] * 2
        error = assert_openai_error(await edit(two), 400, "image")
        assert error["message"].startswith("This model edits one image at a time; got 2.")
        assert_openai_error(await edit([("image", ("a.png", noisy, "image/png"))]), 413)
        assert_openai_error(await edit(image=data_url), 413)
        big = [("image", ("a.png", png(width=65, height=64), "image/png"))]
        error = assert_openai_error(await edit(big), 400, "image")
        assert "--image-max-input-pixels" in error["message"]
        # A mask is bounded the same way, before its size is compared with the image's.
        masked = [
            ("image", ("a.png", png(width=32, height=32), "image/png")),
            ("mask", ("m.png", png_header_only(4096, 4096), "image/png")),
        ]
        assert_openai_error(await edit(masked), 400, "mask")
        ok = await edit([("image", ("a.png", png(), "image/png"))], num_inference_steps="2")
        assert ok.status_code == 200, ok.text
    assert engine.batches == [1]


@pytest.mark.parametrize("parameter", ["image", "mask"])
@pytest.mark.parametrize("side", [5000, 30_000])  # above our limit; above Pillow's own too
async def test_an_image_header_is_checked_before_the_image_is_decoded(
    client: httpx.AsyncClient, parameter: str, side: int
) -> None:
    bomb = ("bomb.png", png_header_only(side, side), "image/png")
    files = {"image": bomb} if parameter == "image" else {"image": ("a.png", png(), "")}
    if parameter == "mask":
        files["mask"] = bomb
    response = await client.post("/v1/images/edits", data={"prompt": "p"}, files=files)
    error = assert_openai_error(response, 400, parameter)
    assert "16777216" in error["message"]  # the pixel limit, not "not a readable image"


async def test_form_fields_are_bounded_while_the_form_is_read(client: httpx.AsyncClient) -> None:
    image = {"image": ("a.png", png(), "image/png")}
    many = {f"field{index}": "1" for index in range(2000)}
    error = assert_openai_error(
        await client.post("/v1/images/edits", data={"prompt": "p", **many}, files=image), 400
    )
    assert "Too many fields" in error["message"]
    huge_field = {"prompt": "x" * (41 * MiB)}  # above 2 x --image-max-input-mb
    response = await client.post("/v1/images/edits", data=huge_field, files=image)
    error = assert_openai_error(response, 400)
    assert "maximum size" in error["message"] and "xxxx" not in error["message"]


async def test_edit_pixels_per_request_count_n_images_of_the_output_size(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    app, engine = await app_with(make_app, tiny_runner, ["--image-max-request-pixels", "64x64"])
    async with http_client(app) as http:
        response = await http.post(
            "/v1/images/variations",
            data={"n": "2"},
            files={"image": ("a.png", png(), "image/png")},
        )
        assert_openai_error(response, 400, "n")
    assert engine.batches == []


# --- what the model can make of an input: the planned size -----------------------------------


async def test_an_image_or_size_beyond_8_to_1_is_refused_before_decoding_or_queueing(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    """The issue's 8x2097152 PNG (within --image-max-input-pixels) planned a 16x1048576
    output: now its header alone is refused with the aspect bound (it holds no pixel data: a
    decoded image would read "not readable"); an explicit size alike, for every route."""
    app, engine = await app_with(make_app, tiny_runner)
    async with http_client(app) as http:
        for route in ("/v1/images/edits", "/v1/images/variations"):
            for side in ((8, 2_097_152), (2_097_152, 8), (64, 520)):
                thin = ("thin.png", png_header_only(*side), "image/png")
                response = await http.post(
                    route, data={"prompt": "p", "size": "auto"}, files={"image": thin}
                )
                error = assert_openai_error(response, 400, "image")
                assert "at most 8 times its shortest (8:1)" in error["message"]
            square = ("a.png", png(), "image/png")
            response = await http.post(
                route, data={"prompt": "p", "size": "64x1024"}, files={"image": square}
            )
            assert "8:1" in assert_openai_error(response, 400, "size")["message"]
        error = assert_openai_error(await generate(http, size="2048x128"), 400, "size")
        assert "8:1" in error["message"]
    assert engine.batches == []


async def test_an_auto_size_edit_is_within_the_pixel_limit_after_rounding(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    """A 24x176 image at --image-max-pixels 1024: scaled to 11x86, whose sides round to
    16x80 (1280 pixels, past the limit); the plan shortens the long side instead: 16x64."""
    app, engine = await app_with(make_app, tiny_runner, ["--image-max-pixels", "1024"])
    async with http_client(app) as http:
        response = await http.post(
            "/v1/images/variations",
            data={"size": "auto", "num_inference_steps": "2"},
            files={"image": ("tall.png", png(width=24, height=176), "image/png")},
        )
        assert response.status_code == 200, response.text
        assert response.json()["size"] == "16x64"
        [item] = response.json()["data"]
        assert decode_image_base64(item["b64_json"]).size == (16, 64)
    assert engine.batches == [1]
