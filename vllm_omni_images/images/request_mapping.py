"""`to_engine_request(request, context, inputs)`: an Images API request as engine work, held to
what needs the server and the served model (`MappingContext`); each refusal is a
`VLLMValidationError` naming the field (a 400)."""

from __future__ import annotations

import dataclasses
import random
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.engine.base import (
    AdapterStack,
    EngineRequest,
    LoRAAdapter,
    ModelDefaults,
    ScaledAdapter,
    adapter_stack,
)
from vllm_omni_images.images.limits import DEFAULT_LIMITS, EDIT_INPUT_IMAGES, ImageLimits
from vllm_omni_images.images.protocol import (
    MAX_STEPS,
    SIZE_PATTERN,
    ImageEditRequest,
    ImageGenerationRequest,
)

if TYPE_CHECKING:
    from vllm_omni_images.images.edits import ImageInputs

UINT64_MASK = 2**64 - 1

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


@dataclass(frozen=True)
class MappingContext:
    """What a request is mapped against, besides itself."""

    request_id: str
    defaults: ModelDefaults
    """The served model's: what the request leaves unset, and its size rule."""
    limits: ImageLimits = DEFAULT_LIMITS
    lora: LoRAAdapter | None = None
    """The adapter the request's `model` names; `None`: the base model."""
    listed: tuple[LoRAAdapter, ...] = ()
    """The adapters the request's `lora` lists, in its order (`ImageGenerationRequest.lora`)."""
    seed_source: random.Random | None = None
    """The server's draw of seeds for a request without one (`--seed`); `None`: the OS."""


def check_limits(request: ImageGenerationRequest, limits: ImageLimits) -> None:
    """A 400 naming `prompt` or `negative_prompt` over `--image-max-prompt-chars`; called once
    per request (`to_engine_request` for a generation, `edits.read_multipart` for an edit)."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name) or ""
        if len(text) > limits.max_prompt_chars:
            raise VLLMValidationError(
                f"{name} is {len(text)} characters: this server reads at most "
                f"{limits.max_prompt_chars} (--image-max-prompt-chars).",
                parameter=name,
            )


def to_engine_request(
    request: ImageGenerationRequest,
    context: MappingContext,
    inputs: ImageInputs | None = None,
) -> EngineRequest:
    """`request` as engine work: a generation, or an edit (or variation) of `inputs`, which
    `edits.read_multipart` read and counted, and whose prompt it checked."""
    if isinstance(request, ImageEditRequest):
        if inputs is None:
            raise VLLMValidationError("image is required.", parameter="image")
        return _edit_request(request, context, inputs.images, inputs.mask)
    check_limits(request, context.limits)
    defaults = within_limits(context.defaults, context.limits)
    width, height = resolve_size(request.size, defaults)
    return _engine_request(request, context, defaults, width, height)


def _edit_request(
    request: ImageEditRequest,
    context: MappingContext,
    images: list[Image.Image],
    mask: Image.Image | None,
) -> EngineRequest:
    """`size` `auto` (or none) is the input's size, rounded down to what the model can
    produce; a `strength` needs a model that honours it, and must leave at least one step."""
    if len(images) != EDIT_INPUT_IMAGES:  # a caller's bug: read_multipart refuses more
        raise ValueError(f"an edit takes {EDIT_INPUT_IMAGES} image, got {len(images)}")
    image = images[0]
    defaults = within_limits(context.defaults, context.limits)
    if request.strength is not None and not defaults.supports_strength:
        raise VLLMValidationError(
            "strength is not supported by this model: its pipeline never reads it (an edit "
            "there is conditioned on the input image, not started from it); leave strength out.",
            parameter="strength",
        )
    if request.size is None or request.size == "auto":
        width, height = input_size(image.size, defaults)
    else:
        width, height = resolve_size(request.size, defaults)
    engine_request = _engine_request(
        request,
        context,
        defaults,
        width,
        height,
        image=image,
        mask=mask,
        strength=request.strength,
    )
    steps = engine_request.num_inference_steps
    if request.strength is not None and strength_steps(steps, request.strength) < 1:
        raise VLLMValidationError(
            f"strength {request.strength:g} leaves none of the {steps} denoising steps to run "
            "(an edit runs the last steps x strength of them): raise strength or "
            "num_inference_steps.",
            parameter="strength",
        )
    return engine_request


def _engine_request(
    request: ImageGenerationRequest,
    context: MappingContext,
    defaults: ModelDefaults,
    width: int,
    height: int,
    **inputs: Any,
) -> EngineRequest:
    check_request_pixels(request.n, width, height, context.limits)
    stack = request_stack(request, context)
    steps_default, true_cfg_default, guidance_default = stack_defaults(request, stack, defaults)
    steps = request.num_inference_steps
    if steps is not None and steps < defaults.min_steps:
        raise VLLMValidationError(
            f"num_inference_steps must be at least {defaults.min_steps} for this model: "
            "its scheduler cannot make an image in fewer steps.",
            parameter="num_inference_steps",
        )
    partial_images = request.partial_images or 0
    if partial_images and not defaults.supports_partial_images:
        raise VLLMValidationError(
            "partial_images is not served by this model and engine (previews come from "
            "the diffusers engine for the Qwen-Image family, or from the vllm-omni engine "
            "started with --diffusion-streaming-output); stream with partial_images 0.",
            parameter="partial_images",
        )
    return EngineRequest(
        partial_images=partial_images,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seeds=image_seeds(request.seed, request.n, context.seed_source),
        width=width,
        height=height,
        num_inference_steps=steps
        or quality_steps(request.quality, steps_default, defaults.min_steps),
        true_cfg_scale=_first_set(request.true_cfg_scale, true_cfg_default),
        guidance_scale=_first_set(request.guidance_scale, guidance_default),
        request_id=context.request_id,
        loras=stack,
        **inputs,
    )


def request_stack(request: ImageGenerationRequest, context: MappingContext) -> AdapterStack:
    """The adapters the request applies: the one `model` names (at `lora_scale`), then those
    `lora` lists (each at its `scale`); a 400 naming `lora_scale` without an adapter in
    `model`, or `lora` for an adapter listed twice or more adapters than `--max-loras`."""
    if request.lora_scale is not None and context.lora is None:
        raise VLLMValidationError(
            "lora_scale sets the strength of the LoRA adapter that model names, and the "
            f"model {'the server serves' if request.model is None else repr(request.model)} "
            "is the base model: name an adapter in model (GET /v1/models lists them), give "
            "each adapter of lora its own scale, or leave lora_scale out.",
            parameter="lora_scale",
        )
    scaled = []
    if context.lora is not None:
        strength = 1.0 if request.lora_scale is None else request.lora_scale
        scaled.append(ScaledAdapter(context.lora, strength))
    choices = request.lora or []
    scaled += [ScaledAdapter(a, c.scale) for a, c in zip(context.listed, choices, strict=True)]
    names = [s.adapter.name for s in scaled]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise VLLMValidationError(
            f"LoRA adapter '{twice}' is named twice (in model and lora, or twice in lora): "
            "name each adapter once, with the scale it is to have.",
            parameter="lora",
        )
    if len(scaled) > context.limits.max_loras:
        raise VLLMValidationError(
            f"this request applies {len(scaled)} LoRA adapters and this server applies at "
            f"most {context.limits.max_loras} together (--max-loras): name fewer.",
            parameter="lora",
        )
    return adapter_stack(scaled)


def stack_defaults(
    request: ImageGenerationRequest, stack: AdapterStack, defaults: ModelDefaults
) -> tuple[int, float | None, float | None]:
    """The default steps, true CFG and guidance for `request`: its adapters' (an operator's
    `AdapterDefaults`) where they give one, else the model's. Two adapters that give one
    knob different values leave the choice to the request: a 400 naming the knob, unless
    the request sets it."""
    chosen: dict[str, float] = {}
    for scaled in stack:
        for knob, value in scaled.adapter.defaults.given().items():
            if chosen.setdefault(knob, value) != value and getattr(request, knob) is None:
                raise VLLMValidationError(
                    f"the LoRA adapters of this request default {knob} to different values "
                    f"({chosen[knob]:g} and {value:g}): set {knob} in the request.",
                    parameter=knob,
                )
    return (
        int(chosen.get("num_inference_steps", defaults.num_inference_steps)),
        chosen.get("true_cfg_scale", defaults.true_cfg_scale),
        chosen.get("guidance_scale", defaults.guidance_scale),
    )


def strength_steps(num_inference_steps: int, strength: float) -> int:
    """The denoising steps an edit runs: the last `num_inference_steps x strength` of the
    schedule, counted as diffusers' image-to-image pipelines count them."""
    return num_inference_steps - int(max(num_inference_steps - num_inference_steps * strength, 0))


def input_size(size: tuple[int, int], defaults: ModelDefaults) -> tuple[int, int]:
    """The size nearest an input image's `size` that the model can produce, after every
    rounding within `max_pixels` and each side within `max_side`: scaled down to fit both, then
    each side rounded down to the size multiple (at least one multiple)."""
    width, height = size
    multiple = defaults.size_multiple
    scale = min(1.0, (defaults.max_pixels / (width * height)) ** 0.5)
    if (longest := longest_side(defaults)) is not None:
        scale = min(scale, longest / max(width, height))
    width, height = (max(multiple, int(side * scale) // multiple * multiple) for side in size)
    if width * height > defaults.max_pixels:
        # Rounding raised a side (the short one, to one multiple): the long side gives way.
        short = min(width, height)
        long = max(multiple, defaults.max_pixels // short // multiple * multiple)
        width, height = (short, long) if width == short else (long, short)
    return width, height


def longest_side(defaults: ModelDefaults) -> int | None:
    """The model's `max_side` as a multiple of its size multiple; `None` without one."""
    if defaults.max_side is None:
        return None
    multiple = defaults.size_multiple
    return max(multiple, defaults.max_side // multiple * multiple)


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
    longest = longest_side(defaults)
    if longest is not None and max(width, height) > longest:
        raise VLLMValidationError(
            f"size {size!r} is too large for this model: its transformer encodes the positions "
            f"of at most {longest} pixels per side.",
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
    """One seed per image, `seed, seed+1, ...`; without `seed`, the base is drawn from `source`
    (`--seed`'s generator) or else the OS."""
    if seed is not None:
        base = seed
    else:
        base = source.getrandbits(63) if source is not None else secrets.randbits(63)
    # torch's generators take 64-bit unsigned seeds; wrapping keeps int64 input valid.
    return tuple((base + offset) & UINT64_MASK for offset in range(n))


def _first_set(requested: float | None, default: float | None) -> float | None:
    return default if requested is None else requested
