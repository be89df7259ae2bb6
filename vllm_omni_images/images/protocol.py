"""Pydantic models of the OpenAI Images API (`POST /v1/images/generations`).

Field names, types and defaults follow OpenAI's API; the extensions (`negative_prompt`,
`num_inference_steps`, `guidance_scale`, `true_cfg_scale`, `seed`, `lora_scale`) are the
diffusion knobs OpenAI's models do not expose.

What a request can be refused for is checked once, where what it depends on is known:

- the request alone (a field this server never honours, `stream` with `n` > 1, ...): by the
  models' validators as the request is parsed, raising vLLM's `VLLMValidationError` as vLLM's
  own request models do;
- the server's limits on what the request says (prompt length): `check_limits(limits)`;
- the served model and the pixels it is asked for: as the request maps itself onto engine
  work, `to_engine_request(defaults, request_id, limits, lora=, seed_source=)`, as vLLM's
  requests map themselves to sampling parameters: the model's defaults and limits (the size
  rule), the server's pixel limits (per image and per request) and the adapter the request's
  `model` chose (`lora_scale` needs one) apply there.
"""

from __future__ import annotations

import dataclasses
import random
import re
import secrets
import time
from typing import Any, Literal, Self

from PIL import Image
from pydantic import ConfigDict, Field, field_validator, model_validator
from vllm.entrypoints.serve.engine.protocol import OpenAIBaseModel
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.engine.base import EngineRequest, LoRAAdapter, ModelDefaults
from vllm_omni_images.images.limits import DEFAULT_LIMITS, EDIT_INPUT_IMAGES, ImageLimits

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MASK = 2**64 - 1
SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

ResponseFormat = Literal["b64_json", "url"]
OutputFormat = Literal["png", "jpeg", "webp"]


Quality = Literal["auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"]

QUALITY_STEP_FACTORS: dict[str, float] = {
    "low": 0.25,
    "medium": 0.5,
    "auto": 1.0,
    "standard": 1.0,
    "high": 1.0,
    "hd": 1.5,
    "xhigh": 1.5,
    "max": 2.0,
}
"""`quality` as a share of the model's default denoising steps (diffusion's quality knob)."""

MAX_STEPS = 200
MAX_LORA_SCALE = 100.0
"""Most strength (either sign) a request may give its adapter, as ComfyUI's LoRA loader."""

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


class ImageGenerationRequest(OpenAIBaseModel):
    # Every field a client sends is honoured or refused by name; none is dropped unread.
    model_config = ConfigDict(extra="forbid")

    # Its length limit is the server's (--image-max-prompt-chars): `check_limits`.
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = Field(
        default=None,
        description="`WIDTHxHEIGHT` in pixels, or `auto` for the model's default size.",
    )
    response_format: ResponseFormat | None = "b64_json"
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

    def check_limits(self, limits: ImageLimits) -> None:
        """A 400 naming `prompt` or `negative_prompt` when it is longer than the server reads
        (`--image-max-prompt-chars`). Made once per request: by `to_engine_request` for a
        generation, and as an edit's form is read, before its images are decoded
        (`edits.read_multipart`)."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name) or ""
            if len(text) > limits.max_prompt_chars:
                raise VLLMValidationError(
                    f"{name} is {len(text)} characters: this server reads at most "
                    f"{limits.max_prompt_chars} (--image-max-prompt-chars).",
                    parameter=name,
                )

    def to_engine_request(
        self,
        defaults: ModelDefaults,
        request_id: str,
        limits: ImageLimits = DEFAULT_LIMITS,
        *,
        lora: LoRAAdapter | None = None,
        seed_source: random.Random | None = None,
    ) -> EngineRequest:
        """This request as engine work: the served model's defaults fill what it leaves unset;
        `lora` is the adapter its `model` names, `seed_source` the server's draw of seeds for
        a request without one (`--seed`).

        Raises `VLLMValidationError`, naming the field, for what the model cannot honour or
        the server's `limits` do not allow.
        """
        self.check_limits(limits)
        defaults = within_limits(defaults, limits)
        width, height = resolve_size(self.size, defaults)
        return self._engine_request(
            defaults, request_id, width, height, limits, lora=lora, seed_source=seed_source
        )

    def _engine_request(
        self,
        defaults: ModelDefaults,
        request_id: str,
        width: int,
        height: int,
        limits: ImageLimits,
        *,
        lora: LoRAAdapter | None,
        seed_source: random.Random | None,
        **inputs: Any,
    ) -> EngineRequest:
        check_request_pixels(self.n, width, height, limits)
        if self.lora_scale is not None and lora is None:
            raise VLLMValidationError(
                "lora_scale sets the strength of a LoRA adapter, and the model "
                f"{'the server serves' if self.model is None else repr(self.model)} is the "
                "base model: name an adapter in model (GET /v1/models lists them), or leave "
                "lora_scale out.",
                parameter="lora_scale",
            )
        if self.num_inference_steps is not None and self.num_inference_steps < defaults.min_steps:
            raise VLLMValidationError(
                f"num_inference_steps must be at least {defaults.min_steps} for this model: "
                "its scheduler cannot make an image in fewer steps.",
                parameter="num_inference_steps",
            )
        partial_images = self.partial_images or 0
        if partial_images and not defaults.supports_partial_images:
            raise VLLMValidationError(
                "partial_images is not supported by this model and engine (it cannot decode "
                "previews of its intermediate steps); stream with partial_images 0.",
                parameter="partial_images",
            )
        return EngineRequest(
            partial_images=partial_images,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seeds=image_seeds(self.seed, self.n, seed_source),
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps
            or quality_steps(self.quality, defaults.num_inference_steps, defaults.min_steps),
            true_cfg_scale=_first_set(self.true_cfg_scale, defaults.true_cfg_scale),
            guidance_scale=_first_set(self.guidance_scale, defaults.guidance_scale),
            request_id=request_id,
            lora=lora,
            lora_scale=1.0 if self.lora_scale is None else self.lora_scale,
            **inputs,
        )


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

    def to_edit_request(
        self,
        defaults: ModelDefaults,
        request_id: str,
        images: list[Image.Image],
        mask: Image.Image | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
        *,
        lora: LoRAAdapter | None = None,
        seed_source: random.Random | None = None,
    ) -> EngineRequest:
        """This edit of `images` as engine work; `size` `auto` (or none) is the input's size,
        rounded down to what the model can produce (the rest as `to_engine_request`).

        `images` are as `edits.read_multipart` read them: their count, and this request's
        `check_limits`, were checked there, before any image was decoded."""
        if len(images) != EDIT_INPUT_IMAGES:  # a caller's bug: read_multipart refuses more
            raise ValueError(f"an edit takes {EDIT_INPUT_IMAGES} image, got {len(images)}")
        image = images[0]
        defaults = within_limits(defaults, limits)
        if self.size is None or self.size == "auto":
            width, height = input_size(image, defaults)
        else:
            width, height = resolve_size(self.size, defaults)
        request = self._engine_request(
            defaults,
            request_id,
            width,
            height,
            limits,
            lora=lora,
            seed_source=seed_source,
            image=image,
            mask=mask,
            strength=self.strength,
        )
        if (
            self.strength is not None
            and strength_steps(request.num_inference_steps, self.strength) < 1
        ):
            raise VLLMValidationError(
                f"strength {self.strength:g} leaves none of the {request.num_inference_steps} "
                "denoising steps to run (an edit runs the last steps x strength of them): raise "
                "strength or num_inference_steps.",
                parameter="strength",
            )
        return request


def strength_steps(num_inference_steps: int, strength: float) -> int:
    """The denoising steps an edit runs: the last `num_inference_steps x strength` of the
    schedule, counted as diffusers' image-to-image pipelines count them."""
    return num_inference_steps - int(max(num_inference_steps - num_inference_steps * strength, 0))


class ImageVariationRequest(ImageEditRequest):
    """The text fields of `POST /v1/images/variations`: an edit without a prompt or mask."""

    prompt: str = ""

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        return prompt  # a variation needs no prompt


def input_size(image: Image.Image, defaults: ModelDefaults) -> tuple[int, int]:
    """The size nearest `image`'s that the model can produce: scaled down to `max_pixels` if
    larger, then each side rounded down to the size multiple (at least one multiple)."""
    width, height = image.size
    if width * height > defaults.max_pixels:
        scale = (defaults.max_pixels / (width * height)) ** 0.5
        width, height = int(width * scale), int(height * scale)
    multiple = defaults.size_multiple
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def quality_steps(quality: str | None, default_steps: int, min_steps: int = 1) -> int:
    """The denoising steps `quality` asks for: a share of the model's default steps (see
    `QUALITY_STEP_FACTORS`), at least the model's `min_steps` and at most `MAX_STEPS`."""
    factor = QUALITY_STEP_FACTORS[quality or "auto"]
    return max(min_steps, min(MAX_STEPS, round(default_steps * factor)))


# The size rule, in one place: the pattern (checked as the request is parsed), then what the
# served model can generate (checked as it is mapped to engine work).


def parse_size(size: str) -> tuple[int, int]:
    """`"1024x768"` -> `(1024, 768)` (width, height)."""
    match = SIZE_PATTERN.match(size)
    if match is None:
        raise ValueError(f"size must be 'WIDTHxHEIGHT' in pixels, got {size!r}")
    return int(match.group(1)), int(match.group(2))


def resolve_size(size: str | None, defaults: ModelDefaults) -> tuple[int, int]:
    """The `(width, height)` to generate: the model's default size for `None` or `auto`."""
    if size is None or size == "auto":
        return defaults.width, defaults.height
    width, height = parse_size(size)
    multiple = defaults.size_multiple
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise VLLMValidationError(
            f"size {size!r} is not supported by this model: width and height must be "
            f"positive multiples of {multiple} (e.g. '{defaults.width}x{defaults.height}').",
            parameter="size",
        )
    if width * height > defaults.max_pixels:
        raise VLLMValidationError(
            f"size {size!r} is too large: this server generates at most "
            f"{defaults.max_pixels} pixels per image (--image-max-pixels).",
            parameter="size",
        )
    return width, height


def within_limits(defaults: ModelDefaults, limits: ImageLimits) -> ModelDefaults:
    """The model's defaults with the server's pixel limit per image (`--image-max-pixels`) in
    place of the model's own, when the operator set one."""
    if limits.max_pixels is None:
        return defaults
    return dataclasses.replace(defaults, max_pixels=limits.max_pixels)


def check_request_pixels(num_images: int, width: int, height: int, limits: ImageLimits) -> None:
    """A request's images together are at most `--image-max-request-pixels`; a 400 naming
    `n` (or `size` for one image) otherwise."""
    total = num_images * width * height
    if total > limits.max_request_pixels:
        raise VLLMValidationError(
            f"{num_images} image(s) of {width}x{height} are {total} pixels: this server makes "
            f"at most {limits.max_request_pixels} pixels per request "
            "(--image-max-request-pixels). Ask for fewer or smaller images.",
            parameter="n" if num_images > 1 else "size",
        )


def image_seeds(seed: int | None, n: int, source: random.Random | None = None) -> tuple[int, ...]:
    """One seed per image: `seed, seed+1, ...` so the `n` images of a request differ and a
    request is reproducible; without one, a base seed drawn from `source` (the server's, seeded
    by `--seed`, as vLLM seeds its sampling: a run of seedless requests repeats after a
    restart) or, without a source, from the operating system."""
    if seed is not None:
        base = seed
    else:
        base = source.getrandbits(63) if source is not None else secrets.randbits(63)
    # torch's generators take 64-bit unsigned seeds; wrapping keeps int64 input valid.
    return tuple((base + offset) & UINT64_MASK for offset in range(n))


def _first_set(requested: float | None, default: float | None) -> float | None:
    return default if requested is None else requested


class ImageObject(OpenAIBaseModel):
    """One image: inline (`b64_json`) or at a URL that expires (`url`), as asked."""

    b64_json: str | None = None
    url: str | None = None


class ImageGenerationResponse(OpenAIBaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageObject]
    size: str
    output_format: OutputFormat
