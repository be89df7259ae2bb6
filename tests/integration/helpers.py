"""Small helpers shared by the in-process API tests."""

from __future__ import annotations

import httpx
import numpy as np
from fastapi import FastAPI

from vllm_omni_images.images.encoding import decode_image_base64

FAST = {"size": "64x64", "num_inference_steps": 2}


def http_client(app: FastAPI) -> httpx.AsyncClient:
    """A client that calls `app` in-process; use it as `async with http_client(app) as client`."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_image_base64(b64))


async def generate(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await client.post("/v1/images/generations", json={"prompt": "a red fox", **body})


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].endswith(param)
    return error
