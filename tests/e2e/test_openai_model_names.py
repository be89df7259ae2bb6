"""What apps written for OpenAI's image models depend on, through `vllm serve` and the official
`openai` SDK: every served name (the aliases of `--served-model-name`, the LoRA adapter) on
every route, OpenAI's default `response_format` by model name, URLs that open with a key the
file route does not need, and `usage` in every response (docs/clients.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.support.image_answers import image_tokens, png_at, png_of, prompt_token_counter
from tests.support.images import FAST_STEPS, png

from .live_server import ADAPTERS, API_KEY, AUTH, SERVED_NAMES

pytestmark = pytest.mark.e2e

EVERY_NAME = (*SERVED_NAMES, *ADAPTERS)
"""The base model's served names, and the shared server's LoRA adapters."""
PATCHES_64 = image_tokens(64, 64)
"""A 64x64 image of the tiny Qwen-Image in latent patches (16 x 16 pixels each)."""


@pytest.fixture
def sdk(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def prompt_tokens(tiny_model_dir: Path) -> Callable[[str], int]:
    """The tiny model's own tokenizer, as the text encoder reads a prompt."""
    return prompt_token_counter(tiny_model_dir)


def image_of(item: openai.types.Image) -> Image.Image:
    """An answer's PNG, inline or fetched from its URL (without a key, as a browser)."""
    if item.b64_json is not None:
        return png_of(item.b64_json)
    assert item.url is not None
    return png_at(item.url)


@pytest.mark.parametrize("name", EVERY_NAME)
def test_every_served_name_generates_edits_and_varies(sdk, name):
    knobs = {"extra_body": {**FAST_STEPS, "seed": 1}, "size": "64x64"}
    results = [
        sdk.images.generate(model=name, prompt="a kite", **knobs),
        sdk.images.edit(model=name, image=("in.png", png()), prompt="a kite", **knobs),
        sdk.images.create_variation(model=name, image=("in.png", png()), **knobs),
    ]
    for result in results:
        assert result.data is not None and len(result.data) == 1
        assert image_of(result.data[0]).size == (64, 64)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("dall-e-2", "url"), ("dall-e-3", "url"), ("gpt-image-1", "b64_json"),
     ("tiny-qwen-image", "b64_json"), ("style", "b64_json")],
)  # fmt: skip
def test_without_response_format_each_name_gets_openais_default(sdk, name, expected):
    """OpenAI answers a URL for DALL-E models and inline bytes for GPT image models: a client
    that names either and no response_format finds what it reads (LangChain's wrapper reads
    `url`, LibreChat `b64_json`)."""
    knobs = {"extra_body": {**FAST_STEPS, "seed": 2}, "size": "64x64"}
    generated = sdk.images.generate(model=name, prompt="a kite", **knobs)
    varied = sdk.images.create_variation(model=name, image=("in.png", png()), **knobs)
    for result in (generated, varied):
        assert result.data is not None
        [item] = result.data
        assert (item.url is not None, item.b64_json is not None) == (
            expected == "url",
            expected == "b64_json",
        )
        assert image_of(item).size == (64, 64)
    # An explicit format still wins over the name's default.
    inline = sdk.images.generate(model=name, prompt="a kite", response_format="b64_json", **knobs)
    assert inline.data is not None and inline.data[0].b64_json is not None


def test_a_url_opens_with_an_authorization_header_it_does_not_need(sdk):
    """Open WebUI fetches a `url` answer server-side with its Bearer key: the file route, which
    needs no key, must not refuse one (the right key or a wrong one)."""
    result = sdk.images.generate(
        model="dall-e-2", prompt="a kite", size="64x64", extra_body=FAST_STEPS
    )
    assert result.data is not None and result.data[0].url is not None
    url = result.data[0].url
    bare = httpx.get(url, timeout=60)
    assert bare.status_code == 200 and bare.content.startswith(b"\x89PNG")
    for headers in (AUTH, {"Authorization": "Bearer not-this-servers-key"}):
        with_key = httpx.get(url, headers=headers, timeout=60)
        assert with_key.status_code == 200, with_key.text
        assert with_key.content == bare.content


def test_usage_counts_prompt_tokens_and_latent_patches(sdk, prompt_tokens):
    prompt, negative = "a lighthouse at dawn", "blurry, low quality"
    generated = sdk.images.generate(
        model="gpt-image-1",
        prompt=prompt,
        n=2,
        size="64x64",
        extra_body={**FAST_STEPS, "negative_prompt": negative},
    )
    usage = generated.usage
    assert usage is not None
    text = prompt_tokens(prompt) + prompt_tokens(negative)
    assert text > 0
    assert usage.input_tokens_details.text_tokens == text
    assert usage.input_tokens_details.image_tokens == 0
    assert usage.input_tokens == text
    assert usage.output_tokens == 2 * PATCHES_64
    assert usage.output_tokens_details is not None
    assert usage.output_tokens_details.image_tokens == 2 * PATCHES_64
    assert usage.total_tokens == text + 2 * PATCHES_64
    assert (generated.size, generated.output_format, generated.background) == (
        "64x64",
        "png",
        "opaque",
    )

    edited = sdk.images.edit(
        image=("in.png", png(width=128, height=64)), prompt=prompt, extra_body=FAST_STEPS
    )
    assert edited.usage is not None and edited.size == "128x64"  # an edit's size: its input's
    assert edited.usage.input_tokens_details.image_tokens == 2 * PATCHES_64
    assert edited.usage.input_tokens == prompt_tokens(prompt) + 2 * PATCHES_64
    assert edited.usage.output_tokens == 2 * PATCHES_64

    varied = sdk.images.create_variation(image=("in.png", png()), extra_body=FAST_STEPS)
    assert varied.usage is not None
    assert varied.usage.input_tokens_details.text_tokens == 0  # a variation has no prompt
    assert varied.usage.input_tokens == PATCHES_64


def test_the_completed_stream_event_carries_usage(server, prompt_tokens):
    body = {"prompt": "a kite", "size": "64x64", "stream": True, "model": "gpt-image-1",
            **FAST_STEPS}  # fmt: skip
    with httpx.stream(
        "POST", f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=120
    ) as response:
        assert response.status_code == 200
        events = [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]
    completed = events[-1]
    assert completed["type"] == "image_generation.completed"
    assert completed["usage"] == {
        "input_tokens": prompt_tokens("a kite"),
        "input_tokens_details": {"text_tokens": prompt_tokens("a kite"), "image_tokens": 0},
        "output_tokens": PATCHES_64,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": PATCHES_64},
        "total_tokens": prompt_tokens("a kite") + PATCHES_64,
    }
