"""Pydantic models of the OpenAI Images API, with the diffusion extensions (`negative_prompt`,
`num_inference_steps`, `guidance_scale`, `true_cfg_scale`, `seed`, `lora_scale`, `lora`). Their
validators refuse what the request alone decides, raising vLLM's `VLLMValidationError`.

A JSON body is validated strictly, as OpenAI's API does (`"n": "2"` and `"stream": "yes"` are
400s; an int is a valid float); a form's fields, which are always strings, are parsed
(`edits.read_multipart` validates with `strict=False`)."""

from __future__ import annotations

import json
import re
import time
from typing import Literal, Self

from pydantic import (
    AliasChoices,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from vllm.entrypoints.serve.engine.protocol import OpenAIBaseModel
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.response_formats import ResponseFormat

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
MAX_ASPECT_RATIO = 8
"""The longest side of an input image or a `size` at most this many times its shortest."""

OutputFormat = Literal["png", "jpeg", "webp"]


Quality = Literal["auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"]

MAX_STEPS = 200
MAX_LORA_SCALE = 100.0
"""Most strength (either sign) a request may give its adapter, as ComfyUI's LoRA loader."""
MAX_LISTED_LORAS = 16
"""Most entries `lora` may list (the server's own limit, `--max-loras`, is usually lower)."""
LORA_PATH_KEYS = ("path", "lora_path", "local_path", "int_id", "lora_int_id")
"""Keys of vllm-omni's own `lora` object that load an adapter from a path: refused here,
where only the operator loads adapters (`--lora-modules`, `/v1/load_lora_adapter`)."""

UNSUPPORTED_FIELDS: dict[str, str] = {
    "style": "style is a DALL-E 3 prompt rewrite; a diffusion pipeline has no equivalent. "
    "Describe the style in the prompt.",
    "complexity": "complexity is not supported by this server.",
    "frame_count": "this server generates still images, not animations.",
    "frame_duration_ms": "this server generates still images, not animations.",
    "svg": "this server generates raster images, not SVG.",
}
"""OpenAI fields this server cannot honour in any value: each is a 400 that names it."""

EDIT_ONLY_UNSUPPORTED_FIELDS = ("input_fidelity", "markup")
"""Fields of OpenAI's edits this server cannot honour in any value (`strength` is its knob)."""


def check_aspect_ratio(width: int, height: int, parameter: str) -> None:
    """A 400 naming `parameter` for an image or size more elongated than `MAX_ASPECT_RATIO`."""
    if width > 0 and height > 0 and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        fix = "Ask for a less elongated size." if parameter == "size" else "Crop or pad it."
        raise VLLMValidationError(
            f"{parameter} is {width}x{height}: its longest side may be at most "
            f"{MAX_ASPECT_RATIO} times its shortest ({MAX_ASPECT_RATIO}:1). {fix}",
            parameter=parameter,
        )


class LoRAChoice(OpenAIBaseModel):
    """One served adapter of a request's `lora`, at a strength; keyed as vllm-omni's own
    `lora` object (`name`, `scale`, and their aliases `lora_name`, `adapter`, `lora_scale`)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(
        min_length=1, max_length=256, validation_alias=AliasChoices("name", "lora_name", "adapter")
    )
    scale: float = Field(
        default=1.0,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        validation_alias=AliasChoices("scale", "lora_scale"),
    )

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, value: object) -> object:
        if isinstance(value, dict) and (keys := [k for k in LORA_PATH_KEYS if k in value]):
            raise ValueError(
                f"{keys[0]} is not read here: lora names adapters the server serves (GET "
                "/v1/models lists them); an operator loads adapters from paths "
                "(--lora-modules, /v1/load_lora_adapter)"
            )
        return value


class ImageGenerationRequest(OpenAIBaseModel):
    # Every field a client sends is honoured or refused by name; none is dropped unread. Its
    # type too: a JSON body is held to it strictly (module docstring).
    model_config = ConfigDict(extra="forbid", strict=True)

    # Its length limit is the server's (--image-max-prompt-chars): `request_mapping.check_limits`.
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = Field(
        default=None,
        description="`WIDTHxHEIGHT` in pixels, or `auto` for the model's default size.",
    )
    response_format: ResponseFormat | None = None
    """`None`: the server's default for the model named (`default_response_format`)."""
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Quality | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: Literal["auto", "low"] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    user: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    # Fields of OpenAI's API that this server refuses in every value (UNSUPPORTED_FIELDS).
    style: Literal["vivid", "natural"] | None = None
    complexity: str | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: dict[str, object] | None = None

    # Diffusion extensions.
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=20.0)
    true_cfg_scale: float | None = Field(default=None, ge=0.0, le=20.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    lora_scale: float | None = Field(default=None, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)
    """The strength of the LoRA adapter that `model` names (1: as trained; 0: none)."""
    lora: list[LoRAChoice] | None = None
    """Served adapters to apply together (with the one `model` names, if any), each at its
    `scale`: one object or a list of them; in a form, the same as JSON text."""

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_as_list(cls, value: object, info: ValidationInfo) -> object:
        """One object is a list of one; a form's `lora` is JSON text (a form field is a
        string), a JSON body's is not."""
        if isinstance(value, str) and (info.context or {}).get("form"):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(
                    'must be JSON text in a form: {"name": ..., "scale": ...} or a list of them'
                ) from None
        return [value] if isinstance(value, dict) else value

    @field_validator("lora")
    @classmethod
    def _lora_lists_few(cls, value: list[LoRAChoice] | None) -> list[LoRAChoice] | None:
        if value is not None and len(value) > MAX_LISTED_LORAS:
            raise ValueError(f"may list at most {MAX_LISTED_LORAS} adapters, got {len(value)}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _text_is_unicode(cls, value: object) -> object:
        """Every text field (of every request model) is text a tokenizer reads: a lone
        surrogate, which valid JSON can escape (`"\\ud800"`), cannot be encoded as UTF-8."""
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"must be Unicode text: character {error.start} is a lone surrogate, "
                    "which cannot be encoded as UTF-8"
                ) from None
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must contain text, not only whitespace")
        return prompt

    @field_validator("size")
    @classmethod
    def _size_is_width_x_height(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return size
        match = SIZE_PATTERN.match(size)
        if match is None:
            raise ValueError("size must be 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or 'auto'")
        check_aspect_ratio(int(match.group(1)), int(match.group(2)), "size")
        return size

    @model_validator(mode="after")
    def _refuse_what_cannot_be_honoured(self) -> Self:
        """A 400 naming the first field this server cannot honour in any request. Runs once
        every field is valid, so a field's own error (`n` of 11) is reported first."""
        for name, reason in UNSUPPORTED_FIELDS.items():
            if getattr(self, name) is not None:
                raise VLLMValidationError(f"{name} is not supported: {reason}", parameter=name)
        if self.background == "transparent":
            raise VLLMValidationError(
                "background 'transparent' is not supported: this model generates opaque images.",
                parameter="background",
            )
        if self.moderation == "auto":
            raise VLLMValidationError(
                "moderation 'auto' is not supported: this server moderates no content. Send "
                "'low' or leave it out.",
                parameter="moderation",
            )
        if self.stream:
            if self.n > 1:
                raise VLLMValidationError(
                    "stream returns one image (its events carry no image index): send n=1.",
                    parameter="n",
                )
            if self.response_format == "url":
                raise VLLMValidationError(
                    "stream sends its images inline: use response_format 'b64_json'.",
                    parameter="response_format",
                )
        elif self.partial_images is not None:
            raise VLLMValidationError(
                "partial_images needs stream: true.", parameter="partial_images"
            )
        return self


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of `POST /v1/images/edits` (the images come as files; `edits.py`)."""

    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    """How far the result may move from the input (diffusion extension); the pipeline's own
    default when unset."""
    input_fidelity: Literal["high", "low"] | None = None
    markup: object | None = None

    @model_validator(mode="after")
    def _refuse_what_edits_cannot_honour(self) -> Self:
        for name in EDIT_ONLY_UNSUPPORTED_FIELDS:
            if getattr(self, name) is not None:
                raise VLLMValidationError(
                    f"{name} is not supported: use strength (0-1) for how far an edit may "
                    "move from its input.",
                    parameter=name,
                )
        return self


class ImageVariationRequest(ImageEditRequest):
    """The text fields of `POST /v1/images/variations`: an edit without a prompt or mask."""

    prompt: str = ""

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        return prompt  # a variation needs no prompt


class ImageObject(OpenAIBaseModel):
    """One image: inline (`b64_json`) or at a URL that expires (`url`), as asked."""

    b64_json: str | None = None
    url: str | None = None


class UsageTokenDetails(OpenAIBaseModel):
    text_tokens: int = 0
    image_tokens: int = 0


class ImageUsage(OpenAIBaseModel):
    """OpenAI's `usage` of an images response, counted for diffusion (`images/usage.py`)."""

    input_tokens: int
    input_tokens_details: UsageTokenDetails
    output_tokens: int
    output_tokens_details: UsageTokenDetails
    total_tokens: int


class ImageGenerationResponse(OpenAIBaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageObject]
    size: str
    output_format: OutputFormat
    quality: Quality
    background: Literal["opaque"] = "opaque"
    usage: ImageUsage
