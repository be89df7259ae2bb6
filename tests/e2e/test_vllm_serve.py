"""`vllm serve tiny-qwen-image --task image` as a user runs it, driven by the `openai` SDK."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from vllm_omni_images.encoding import decode_image_base64

pytestmark = pytest.mark.e2e

API_KEY = "e2e-secret"
VLLM = str(Path(sys.executable).parent / "vllm")
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, model_cache: Path, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    env = {**os.environ, "VLLM_OMNI_IMAGES_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [VLLM, "serve", "tiny-qwen-image", "--task", "image", "--host", "127.0.0.1",
             "--port", str(port), "--api-key", API_KEY],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not become healthy:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield base_url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode is not None


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
        extra_body={"seed": 3, "num_inference_steps": 2},
    )
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = decode_image_base64(item.b64_json)
        assert image.format == "PNG"
        assert image.size == (128, 64)
    assert result.data[0].b64_json != result.data[1].b64_json


def test_openai_sdk_sees_errors_as_exceptions(sdk):
    with pytest.raises(openai.BadRequestError) as bad_size:
        sdk.images.generate(prompt="x", size="250x250")
    assert "multiples of 16" in str(bad_size.value)
    with pytest.raises(openai.NotFoundError):
        sdk.images.generate(model="dall-e-3", prompt="x", size="64x64")


def test_openai_sdk_lists_the_model(sdk):
    assert [model.id for model in sdk.models.list()] == ["tiny-qwen-image"]


def test_raw_http_with_and_without_key(server):
    body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2, "seed": 1}
    denied = httpx.post(f"{server}/v1/images/generations", json=body, timeout=60)
    assert denied.status_code == 401
    headers = {"Authorization": f"Bearer {API_KEY}"}
    first = httpx.post(f"{server}/v1/images/generations", json=body, headers=headers, timeout=60)
    second = httpx.post(f"{server}/v1/images/generations", json=body, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["data"] == second.json()["data"]


def test_core_routes(server):
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/version").json()["version"].startswith("0.30")
    metrics = httpx.get(f"{server}/metrics")
    assert metrics.status_code == 200 and "# TYPE" in metrics.text
    tokenize = httpx.post(
        f"{server}/tokenize", json={"prompt": "x"}, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert tokenize.status_code == 404
    assert "error" in tokenize.json()


def test_plain_vllm_serve_help_still_works():
    result = subprocess.run([VLLM, "serve", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Frontend" in result.stdout  # vLLM's own option groups
    assert "ImageTask" in result.stdout  # and ours, listed beside them
