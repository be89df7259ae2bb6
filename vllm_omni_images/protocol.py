"""Pydantic models of the OpenAI Images API (`POST /v1/images/generations`).

Field names, types and defaults follow OpenAI's API; the extensions (`negative_prompt`,
`num_inference_steps`, `guidance_scale`, `true_cfg_scale`, `seed`) are the diffusion knobs
OpenAI's models do not expose. Checks that depend on the served model (the size rule, its
defaults) live in `serving.py`.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import Field, field_validator
from vllm.entrypoints.serve.engine.protocol import OpenAIBaseModel

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_PROMPT_CHARS = 32_000
SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

ResponseFormat = Literal["b64_json", "url"]
OutputFormat = Literal["png", "jpeg", "webp"]


class ImageGenerationRequest(OpenAIBaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = Field(
        default=None,
        description="`WIDTHxHEIGHT` in pixels, or `auto` for the model's default size.",
    )
    response_format: ResponseFormat | None = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    user: str | None = None

    # Diffusion extensions.
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=20.0)
    true_cfg_scale: float | None = Field(default=None, ge=0.0, le=20.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must contain text, not only whitespace")
        return prompt

    @field_validator("size")
    @classmethod
    def _size_is_width_x_height(cls, size: str | None) -> str | None:
        if size is None or size == "auto" or SIZE_PATTERN.match(size):
            return size
        raise ValueError("size must be 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or 'auto'")


def parse_size(size: str) -> tuple[int, int]:
    """`"1024x768"` -> `(1024, 768)` (width, height)."""
    match = SIZE_PATTERN.match(size)
    if match is None:
        raise ValueError(f"size must be 'WIDTHxHEIGHT' in pixels, got {size!r}")
    return int(match.group(1)), int(match.group(2))


class ImageObject(OpenAIBaseModel):
    b64_json: str


class ImageGenerationResponse(OpenAIBaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageObject]
    size: str
    output_format: OutputFormat
