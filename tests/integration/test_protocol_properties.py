"""Property test of the generations protocol: for any JSON a client may send, the server answers
200 with valid images, or a 4xx in OpenAI's error shape; never a 5xx, never a hang.

Hypothesis draws bodies from every field of the API (valid values, values at and past each
limit, values of the wrong JSON type), unknown fields and bodies that are not objects, and posts
them to the in-process app on the real tiny engine. The server runs with a small per-request
pixel budget so that valid draws stay cheap; everything else is the default configuration.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vllm_omni_images.images.encoding import decode_image_base64

from .conftest import AppFactory
from .helpers import http_client

REQUEST_PIXELS = "128x128"  # n x width x height of one request, at most: 16,384 pixels
ANSWER_TIMEOUT_S = 120.0

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly values of the field's own kind (valid or out of range), sometimes any JSON."""
    return st.one_of(valid, valid, valid, JSON_VALUES)


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": field(st.sampled_from(["tiny-qwen-image", "dall-e-3", "gpt-image-1", ""])),
    "n": field(st.integers(-1, 12)),
    "size": field(
        st.sampled_from(
            [
                "16x16",
                "64x64",
                "32x128",
                "128x32",
                "auto",
                "64x63",
                "0x64",
                "64X64",
                "1024x1024",
                "100000x100000",
                "banana",
                "x",
                "-64x64",
                " 64x64",
            ]
        )
        | st.text(max_size=12)
    ),
    "response_format": field(st.sampled_from(["b64_json", "url", "png", ""])),
    "output_format": field(st.sampled_from(["png", "jpeg", "webp", "gif", "svg"])),
    "output_compression": field(st.integers(-5, 105)),
    "quality": field(st.sampled_from(["auto", "low", "medium", "high", "hd", "max", "ultra"])),
    "background": field(st.sampled_from(["auto", "opaque", "transparent", "blue"])),
    "moderation": field(st.sampled_from(["low", "auto", "none"])),
    "style": field(st.sampled_from(["vivid", "natural"])),
    "user": field(st.text(max_size=30)),
    "stream": field(st.booleans()),
    "partial_images": field(st.integers(-1, 4)),
    "negative_prompt": field(st.text(max_size=30)),
    "num_inference_steps": field(st.integers(-1, 201)),
    "guidance_scale": field(st.floats(-1, 21, allow_nan=False)),
    "true_cfg_scale": field(st.floats(-1, 21, allow_nan=False)),
    "seed": field(st.integers(-(2**64), 2**64)),
}

OBJECTS = st.builds(
    lambda prompt, known, unknown: {**prompt, **known, **unknown},
    st.one_of(
        st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=40)}),
        st.fixed_dictionaries({"prompt": JSON_VALUES}),
        st.just({}),
    ),
    st.fixed_dictionaries({}, optional=FIELDS),
    st.dictionaries(st.text(min_size=1, max_size=12), JSON_VALUES, max_size=2),
)
# Bodies that should succeed: every field valid (within the pixel budget), in any combination.
VALID = st.builds(
    lambda prompt, known: {"prompt": prompt, **known},
    st.text(min_size=1, max_size=40).filter(str.strip),
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.just("tiny-qwen-image"),
            "n": st.integers(1, 4),
            "size": st.sampled_from(["16x16", "32x32", "64x64", "16x64", "64x16"]),
            "response_format": st.sampled_from(["b64_json", "url"]),
            "output_format": st.sampled_from(["png", "jpeg", "webp"]),
            "output_compression": st.integers(0, 100),
            "quality": st.sampled_from(["auto", "low", "medium", "high", "standard"]),
            "background": st.sampled_from(["auto", "opaque"]),
            "moderation": st.just("low"),
            "user": st.text(max_size=30),
            "negative_prompt": st.text(max_size=30),
            "num_inference_steps": st.integers(1, 8),
            "guidance_scale": st.floats(0, 20),
            "true_cfg_scale": st.floats(0, 20),
            "seed": st.integers(-(2**63), 2**63 - 1),
        },
    ),
)
STREAMS = st.builds(
    lambda body, partial: {
        **body,
        "n": 1,
        "response_format": "b64_json",
        "stream": True,
        "partial_images": partial,
        "size": "32x32",
    },
    VALID,
    st.integers(0, 3),
)
BODIES = st.one_of(VALID, STREAMS, OBJECTS, OBJECTS, JSON_VALUES)


def check_images(body: dict[str, Any], answer: dict[str, Any]) -> None:
    data = answer["data"]
    assert len(data) == body.get("n", 1)
    width, height = (int(side) for side in answer["size"].split("x"))
    if isinstance(body.get("size"), str) and body["size"] != "auto":
        assert answer["size"] == body["size"]
    for item in data:
        assert set(item) in ({"b64_json"}, {"url"}), item
        if "b64_json" in item:
            image = decode_image_base64(item["b64_json"])
            assert image.size == (width, height)


def check_events(text: str) -> None:
    """A stream: OpenAI's partial/completed events, never an error event."""
    events = [
        line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event:")
    ]
    assert events and events[-1].endswith(".completed"), events
    assert not any(event == "error" for event in events), text[:500]
    for line in text.splitlines():
        if line.startswith("data:"):
            json.loads(line.removeprefix("data:"))


async def answer(client: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await asyncio.wait_for(
        client.post("/v1/images/generations", json=body), timeout=ANSWER_TIMEOUT_S
    )


@pytest.fixture
async def client(make_app: AppFactory, tiny_runner: Any) -> Any:
    app = await make_app(tiny_runner, ["--image-max-request-pixels", REQUEST_PIXELS])
    async with http_client(app) as http:
        yield http


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODIES)
async def test_any_json_gets_images_or_an_openai_4xx(client: httpx.AsyncClient, body: Any) -> None:
    response = await answer(client, body)
    event(f"status {response.status_code}")
    assert response.status_code < 500, (body, response.status_code, response.text[:500])
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            check_events(response.text)
        else:
            check_images(body, response.json())
        return
    assert 400 <= response.status_code < 500, (body, response.status_code)
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["code"] == response.status_code and error["message"], error
    # A client's own input comes back at most as a short prefix (a prompt, a data URL).
    assert len(error["message"]) < 2_000, error["message"][:300]
