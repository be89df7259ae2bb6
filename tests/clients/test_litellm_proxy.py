"""LiteLLM's proxy (litellm[proxy] 1.108.7, .venv-clients) in front of `vllm serve`, run as an
operator runs it: `litellm --config config.yaml`, whose `model_list` names this server's served
names as `openai/<name>` with `api_base` and `api_key`; the official `openai` SDK calls the
proxy with the proxy's own key.

The proxy hands a request's fields to its SDK (`litellm.aimage_generation` / `aimage_edit`), so
the SDK's rules hold here too (tests/e2e/test_client_libraries.py): `response_format` is
refused for generations, fields it does not know (`seed`, `num_inference_steps`) are passed
on, and the cost it puts in `x-litellm-response-cost` comes from the deployment's `model_info`:
from `usage` for a `gpt-image` name, per pixel otherwise. It has no variations route.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml

from testing.server_process import free_port, running_server
from tests.support.image_answers import image_tokens, png_at, png_of, token_priced_cost
from tests.support.images import FAST_STEPS, png

from .environments import API_KEY, CLIENTS_ENV, OFFLINE

pytestmark = pytest.mark.e2e

PROXY_KEY = "sk-proxy-secret"
TOKEN_PRICES = {
    "input_cost_per_token": 1e-6,
    "input_cost_per_image_token": 3e-6,
    "output_cost_per_image_token": 2e-6,
}
PIXEL_PRICE = 1e-8
FAST = {"size": "64x64", "extra_body": {**FAST_STEPS, "seed": 7}}


def deployment(served_name: str, server: str, **prices: float) -> dict[str, Any]:
    """A `model_list` entry that the proxy's clients call `served_name`, for this server."""
    params = {"model": f"openai/{served_name}", "api_base": f"{server}/v1", "api_key": API_KEY}
    entry: dict[str, Any] = {"model_name": served_name, "litellm_params": params}
    if prices:
        entry["model_info"] = {"mode": "image_generation", **prices}
    return entry


@pytest.fixture(scope="module")
def proxy(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("litellm-proxy")
    config = {
        "model_list": [
            deployment("tiny-qwen-image", server, input_cost_per_pixel=PIXEL_PRICE),
            deployment("dall-e-2", server),
            deployment("gpt-image-1", server, **TOKEN_PRICES),
        ],
        "general_settings": {"master_key": PROXY_KEY},
    }
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    litellm = str(CLIENTS_ENV / "bin" / "litellm")
    command = [litellm, "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    log = folder / "litellm.log"
    with running_server(command, port, log, env=OFFLINE, health_path="/health/liveliness") as url:
        yield url


@pytest.fixture
def via_proxy(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy}/v1", api_key=PROXY_KEY, max_retries=0)


@pytest.fixture
def direct(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def cost_header(raw: Any) -> float:
    return float(raw.headers["x-litellm-response-cost"])


def test_a_generation_through_the_proxy_is_the_servers_own_answer_and_usage(via_proxy, direct):
    """`seed` and the steps reach the server (the same image as asked directly), and `usage`
    comes back whole; the deployment's per-pixel price is what the proxy charges."""
    raw = via_proxy.images.with_raw_response.generate(
        model="tiny-qwen-image", prompt="a boat", **FAST
    )
    proxied = raw.parse()
    own = direct.images.generate(model="tiny-qwen-image", prompt="a boat", **FAST)
    assert proxied.data is not None and own.data is not None
    assert png_of(proxied.data[0].b64_json or "").size == (64, 64)
    assert proxied.data[0].b64_json == own.data[0].b64_json
    assert proxied.usage is not None and own.usage is not None
    assert proxied.usage.model_dump() == own.usage.model_dump()
    assert proxied.usage.output_tokens == image_tokens(64, 64)
    assert cost_header(raw) == pytest.approx(64 * 64 * PIXEL_PRICE)


def test_the_proxy_prices_a_gpt_image_deployment_from_usage(via_proxy):
    raw = via_proxy.images.with_raw_response.generate(
        model="gpt-image-1", prompt="a lighthouse", **FAST
    )
    usage = raw.parse().usage
    assert usage is not None and usage.input_tokens_details is not None
    details = usage.input_tokens_details
    expected = token_priced_cost(
        details.text_tokens, details.image_tokens, usage.output_tokens, TOKEN_PRICES
    )
    assert expected > 0 and cost_header(raw) == pytest.approx(expected)


def test_the_proxy_refuses_response_format_so_urls_come_from_a_dall_e_name(via_proxy):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        via_proxy.images.generate(
            model="tiny-qwen-image", prompt="a boat", response_format="url", **FAST
        )
    answer = via_proxy.images.generate(model="dall-e-2", prompt="a boat", **FAST)
    assert answer.data is not None and answer.data[0].url is not None
    assert png_at(answer.data[0].url).size == (64, 64)


def test_an_edit_through_the_proxy_gets_the_image_and_usage(via_proxy):
    answer = via_proxy.images.edit(
        model="tiny-qwen-image",
        image=("in.png", png(), "image/png"),
        prompt="make it blue",
        extra_body=FAST_STEPS,
    )
    assert answer.data is not None
    assert png_of(answer.data[0].b64_json or "").size == (64, 64)
    assert answer.usage is not None and answer.usage.input_tokens_details is not None
    assert answer.usage.input_tokens_details.image_tokens == image_tokens(64, 64)


def test_the_proxy_has_no_variations_route(via_proxy):
    with pytest.raises(openai.NotFoundError):
        via_proxy.images.create_variation(model="tiny-qwen-image", image=("in.png", png()))
