"""Reading an images answer as a client library hands it over: a `url` fetched as a client would
fetch it, a `b64_json` decoded; and the `usage` this server counts for the tiny model (its
image tokens, and its prompt tokens by the model's own tokenizer)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
from PIL import Image

PATCH_PIXELS = 16
"""One image token per 16x16 pixels: the tiny Qwen-Image's latent patch (usage's image tokens)."""


def image_tokens(width: int, height: int, images: int = 1) -> int:
    """The image tokens `usage` counts for `images` pictures of `width`x`height` pixels."""
    return (width // PATCH_PIXELS) * (height // PATCH_PIXELS) * images


def prompt_token_counter(model_dir: Path) -> Callable[[str], int]:
    """Counts a text with the tiny model's own tokenizer, as its text encoder reads a prompt
    (no special tokens): usage's text tokens, counted apart from the server's counter."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def png_at(url: str) -> Image.Image:
    """The PNG a client fetches from `url` (a plain GET, no key), loaded; fails the test
    unless the answer is a 200 PNG."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, f"GET {url}: {response.status_code} {response.text[:200]}"
    assert response.headers["content-type"] == "image/png", response.headers
    return decoded_png(response.content)


def png_of(b64_json: str) -> Image.Image:
    """The PNG a `b64_json` item carries, loaded."""
    return decoded_png(base64.b64decode(b64_json))


def decoded_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG", image.format
    image.load()
    return image


def token_priced_cost(
    text_tokens: int, input_image_tokens: int, output_tokens: int, prices: Mapping[str, float]
) -> float:
    """What LiteLLM charges for an images `usage` at a token price table: text tokens at
    `input_cost_per_token`, input image tokens at `input_cost_per_image_token`, output (image)
    tokens at `output_cost_per_image_token` (litellm_core_utils/llm_cost_calc/utils.py,
    calculate_image_response_cost_from_usage)."""
    return (
        text_tokens * prices["input_cost_per_token"]
        + input_image_tokens * prices["input_cost_per_image_token"]
        + output_tokens * prices["output_cost_per_image_token"]
    )
