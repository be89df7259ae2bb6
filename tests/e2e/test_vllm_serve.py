"""`vllm serve tiny-qwen-image --task image` as a user runs it, driven by the `openai` SDK."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.support.images import FAST_STEPS
from vllm_omni_images.images.encoding import decode_image_base64

from .live_server import ADAPTERS, API_KEY, AUTH, SERVED_NAMES

pytestmark = pytest.mark.e2e


@pytest.fixture
def sdk(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def test_openai_sdk_gets_pngs_of_the_requested_size(sdk):
    result = sdk.images.generate(
        model="tiny-qwen-image",
        prompt="a lighthouse at dawn",
        n=2,
        size="128x64",
        response_format="b64_json",
        extra_body={"seed": 3, **FAST_STEPS},
    )
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = decode_image_base64(item.b64_json)
        assert image.format == "PNG"
        assert image.size == (128, 64)
    assert result.data[0].b64_json != result.data[1].b64_json


def test_a_url_opens_without_the_key_and_holds_the_same_image(sdk, server):
    fields = {"prompt": "a lighthouse", "size": "64x64", "extra_body": {"seed": 5}}
    linked = sdk.images.generate(model="tiny-qwen-image", response_format="url", **fields)
    inline = sdk.images.generate(model="tiny-qwen-image", response_format="b64_json", **fields)
    assert linked.data is not None and inline.data is not None
    url = linked.data[0].url or ""
    assert url.startswith(f"{server}/images/files/")
    fetched = httpx.get(url, timeout=60)  # as a browser: no Authorization header
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(inline.data[0].b64_json or "")


def test_openai_sdk_edits_with_a_mask_and_asks_for_variations(sdk):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 60, 150)).save(buffer, format="PNG")
    mask = io.BytesIO()
    transparent_left = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    transparent_left.paste((0, 0, 0, 0), (0, 0, 32, 64))
    transparent_left.save(mask, format="PNG")
    edited = sdk.images.edit(
        model="tiny-qwen-image",
        image=("in.png", buffer.getvalue(), "image/png"),
        mask=("mask.png", mask.getvalue(), "image/png"),
        prompt="a red fox",
        extra_body={"seed": 2, **FAST_STEPS},
    )
    assert edited.data is not None and edited.size == "64x64"
    kept = np.asarray(decode_image_base64(edited.data[0].b64_json or ""))[:, 33:]
    assert np.abs(kept.astype(int) - (30, 60, 150)).mean() < 1
    varied = sdk.images.create_variation(
        model="tiny-qwen-image",
        image=("in.png", buffer.getvalue(), "image/png"),
        n=2,
        size="256x256",
        extra_body=FAST_STEPS,
    )
    assert varied.data is not None and len(varied.data) == 2


def test_openai_sdk_streams_partial_images_then_the_image(sdk):
    fields = {"prompt": "a lighthouse", "size": "64x64", "extra_body": {"seed": 9}}
    stream = sdk.images.generate(model="tiny-qwen-image", stream=True, partial_images=2, **fields)
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    plain = sdk.images.generate(model="tiny-qwen-image", **fields)
    assert plain.data is not None and plain.data[0].b64_json == events[-1].b64_json


def test_openai_sdk_sees_errors_as_exceptions(sdk):
    with pytest.raises(openai.BadRequestError) as bad_size:
        sdk.images.generate(prompt="x", size="250x250")
    assert "multiples of 16" in str(bad_size.value)
    with pytest.raises(openai.NotFoundError):
        sdk.images.generate(model="dall-e-4", prompt="x", size="64x64")


def test_openai_sdk_lists_the_model_and_its_adapters(sdk):
    cards = [card.model_dump() for card in sdk.models.list()]
    assert [(card["id"], card.get("parent")) for card in cards] == [
        *((name, None) for name in SERVED_NAMES),
        *((name, "tiny-qwen-image") for name in ADAPTERS),
    ]


def test_openai_sdk_picks_the_adapter_by_its_model_name(sdk):
    def image(**fields) -> bytes:
        result = sdk.images.generate(prompt="a boat", size="64x64", **fields)
        return base64.b64decode(result.data[0].b64_json)

    knobs = {"num_inference_steps": 2, "seed": 4}
    base = image(extra_body=knobs)
    styled = image(model="style", extra_body=knobs)
    assert styled != base
    assert image(model="style", extra_body={**knobs, "lora_scale": 1.0}) == styled
    half = image(model="style", extra_body={**knobs, "lora_scale": 0.5})
    assert half not in (base, styled)
    assert image(model="tiny-qwen-image", extra_body=knobs) == base
    with pytest.raises(openai.BadRequestError, match="lora_scale"):
        image(extra_body={**knobs, "lora_scale": 0.5})


def test_adapters_load_and_unload_while_serving(server, tiny_loras):
    """vLLM's own routes, allowed by VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
    body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2, "seed": 1}

    def generate(model: str) -> httpx.Response:
        json = {**body, "model": model}
        return httpx.post(f"{server}/v1/images/generations", json=json, headers=AUTH, timeout=60)

    assert generate("other").status_code == 404
    adapter = {"lora_name": "other", "lora_path": str(tiny_loras["other"])}
    loaded = httpx.post(f"{server}/v1/load_lora_adapter", json=adapter, headers=AUTH)
    assert loaded.status_code == 200, loaded.text
    try:
        assert generate("other").status_code == 200
        bad = {"lora_name": "bad", "lora_path": "/nowhere"}
        refused = httpx.post(f"{server}/v1/load_lora_adapter", json=bad, headers=AUTH)
        assert refused.status_code == 400 and "'bad'" in refused.json()["error"]["message"]
    finally:
        unloaded = httpx.post(
            f"{server}/v1/unload_lora_adapter", json={"lora_name": "other"}, headers=AUTH
        )
    assert unloaded.status_code == 200
    assert generate("other").status_code == 404


def test_raw_http_with_and_without_key(server):
    body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2, "seed": 1}
    denied = httpx.post(f"{server}/v1/images/generations", json=body, timeout=60)
    assert denied.status_code == 401
    first = httpx.post(f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=60)
    second = httpx.post(f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["data"] == second.json()["data"]


def test_each_request_logs_one_line_with_its_timings(server, server_log):
    body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2}
    headers = {**AUTH, "X-Request-Id": "e2e-log-line"}
    response = httpx.post(f"{server}/v1/images/generations", json=body, headers=headers)
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while "e2e-log-line" not in server_log.read_text():
        assert time.monotonic() < deadline, "the request's log line never appeared"
        time.sleep(0.1)
    [line] = [line for line in server_log.read_text().splitlines() if "e2e-log-line" in line]
    assert "INFO" in line and "ok, 64x64, n=1, steps=2, queue=" in line


def test_core_routes(server):
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/version").json()["version"].startswith("0.30")
    metrics = httpx.get(f"{server}/metrics")
    assert metrics.status_code == 200 and "# TYPE" in metrics.text
    tokenize = httpx.post(f"{server}/tokenize", json={"prompt": "x"}, headers=AUTH)
    assert tokenize.status_code == 404
    assert "error" in tokenize.json()


async def test_32_concurrent_mixed_requests_get_exactly_32_correct_responses(server):
    sizes = [(64, 64), (128, 64), (64, 128), (128, 128)]
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)

    async def one(index: int) -> tuple[int, list[str]]:
        width, height = sizes[index % len(sizes)]
        result = await client.images.generate(
            prompt=f"request {index}",
            size=f"{width}x{height}",
            n=1 + index % 3,
            extra_body={"seed": 1000 + index, "num_inference_steps": 2},
        )
        assert result.data is not None
        return index, [item.b64_json or "" for item in result.data]

    async with client:
        results = await asyncio.gather(*(one(i) for i in range(32)))
        assert sorted(index for index, _ in results) == list(range(32))
        for index, images in results:
            assert len(images) == 1 + index % 3
            for b64 in images:
                assert decode_image_base64(b64).size == sizes[index % len(sizes)]
        every_image = [b64 for _, images in results for b64 in images]
        assert len(set(every_image)) == len(every_image), "two responses carry the same image"
        # Each answer is its own request's: asked again alone, a request gives the same images
        # (up to the 1/255 that batched arithmetic may differ by; docs/performance.md).
        for index in (0, 13, 31):
            _, alone = await one(index)
            for batched_b64, alone_b64 in zip(results[index][1], alone, strict=True):
                batched = np.asarray(decode_image_base64(batched_b64), dtype=np.int16)
                assert np.abs(batched - np.asarray(decode_image_base64(alone_b64))).max() <= 1


def cancelled_requests(server: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:image_requests_total{") and 'outcome="cancelled"' in line
    )


def wait_for_cancel_then_serve(server: str, before: float) -> None:
    deadline = time.monotonic() + 30
    while cancelled_requests(server) == before:
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.1)
    quick = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}
    response = httpx.post(f"{server}/v1/images/generations", json=quick, headers=AUTH, timeout=60)
    assert response.status_code == 200


def test_a_client_that_disconnects_stops_its_generation(server):
    before = cancelled_requests(server)
    slow = {"prompt": "x", "size": "512x512", "num_inference_steps": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/images/generations", json=slow, headers=AUTH, timeout=1.0)
    wait_for_cancel_then_serve(server, before)


def test_a_client_that_leaves_a_stream_stops_its_generation(server):
    before = cancelled_requests(server)
    slow = {
        "prompt": "x",
        "size": "512x512",
        "num_inference_steps": 200,
        "stream": True,
        "partial_images": 3,
    }
    url = f"{server}/v1/images/generations"
    with httpx.stream("POST", url, json=slow, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
    # Leaving the `with` closes the connection before any event came.
    wait_for_cancel_then_serve(server, before)
