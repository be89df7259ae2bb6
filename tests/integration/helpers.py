"""Small helpers shared by the in-process API tests."""

from __future__ import annotations

from typing import Any

import httpx
import httpx2
import numpy as np
import openai
from fastapi import FastAPI
from openai.types import ImagesResponse
from prometheus_client.parser import text_string_to_metric_families

from tests.support.images import FAST as FAST  # the tests' one set of fast defaults
from tests.support.images import FAST_STEPS
from vllm_omni_images.images.encoding import decode_image_base64


def http_client(app: FastAPI) -> httpx.AsyncClient:
    """A client that calls `app` in-process; use it as `async with http_client(app) as client`."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def sdk_client(app: FastAPI, api_key: str = "none") -> openai.AsyncOpenAI:
    """The official `openai` SDK calling `app` in-process (its own HTTP client library,
    httpx2, with an ASGI transport); use it as `async with sdk_client(app) as sdk`."""
    transport = httpx2.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        base_url="http://test/v1",
        api_key=api_key,
        http_client=openai.DefaultAsyncHttpxClient(transport=transport, base_url="http://test"),
        max_retries=0,
    )


async def sdk_generate(sdk: openai.AsyncOpenAI, **fields: Any) -> ImagesResponse:
    """One fast, seeded image request of the tiny model, as an app would send it."""
    return await sdk.images.generate(
        model="tiny-qwen-image",
        prompt="a fox",
        size="64x64",
        extra_body={**FAST_STEPS, "seed": 11},
        **fields,
    )


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_image_base64(b64))


async def generate(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await client.post("/v1/images/generations", json={"prompt": "a red fox", **body})


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` with `labels` in a /metrics answer."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].endswith(param)
    return error


async def stream_and_plain(
    sdk: openai.AsyncOpenAI, seeded: dict[str, Any], partial_images: int = 2
) -> tuple[list[Any], ImagesResponse]:
    """A streamed 64x64 generation of the tiny model with `partial_images` previews (its
    events), and the same request unstreamed."""
    stream = await sdk.images.generate(
        model="tiny-qwen-image",
        prompt="a red fox",
        size="64x64",
        stream=True,
        partial_images=partial_images,
        extra_body=seeded,
    )
    events = [event async for event in stream]
    plain = await sdk.images.generate(
        model="tiny-qwen-image", prompt="a red fox", size="64x64", extra_body=seeded
    )
    return events, plain
