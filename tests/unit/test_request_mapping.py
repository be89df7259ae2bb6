import dataclasses
import random
import re
from typing import Any

import pytest
from pydantic import ValidationError
from vllm.entrypoints.serve.engine.protocol import ErrorInfo
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.engine.base import (
    AdapterDefaults,
    LoRAAdapter,
    ModelDefaults,
    ScaledAdapter,
    stack_key,
)
from vllm_omni_images.images.errors import error_response
from vllm_omni_images.images.limits import ImageLimits
from vllm_omni_images.images.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
)
from vllm_omni_images.images.request_mapping import (
    MappingContext,
    image_seeds,
    input_size,
    parse_size,
    request_stack,
    resolve_size,
    stack_defaults,
    to_engine_request,
)

DEFAULTS = ModelDefaults(
    width=256,
    height=256,
    num_inference_steps=4,
    size_multiple=16,
    true_cfg_scale=4.0,
    max_pixels=1024 * 1024,
)


def test_parse_size():
    assert parse_size("1024x768") == (1024, 768)
    assert parse_size(" 64X32 ") == (64, 32)
    with pytest.raises(ValueError):
        parse_size("1024")


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompt_length_is_the_servers_limit(field):
    """The limit is a flag (--image-max-prompt-chars), so it is checked as the request is
    mapped to engine work, a 400 naming the field; the default is 32000 characters."""
    defaults = ModelDefaults(width=64, height=64, num_inference_steps=2, size_multiple=16)
    at_limit = ImageGenerationRequest.model_validate({"prompt": "p", field: "x" * 32_000})
    assert to_engine_request(at_limit, MappingContext("id", defaults)).width == 64
    over = ImageGenerationRequest.model_validate({"prompt": "p", field: "x" * 32_001})
    with pytest.raises(VLLMValidationError) as info:
        to_engine_request(over, MappingContext("id", defaults))
    assert info.value.parameter == field
    assert "32001 characters" in str(info.value) and "x" * 50 not in str(info.value)
    short = ImageLimits(max_prompt_chars=10)
    with pytest.raises(VLLMValidationError):
        to_engine_request(at_limit, MappingContext("id", defaults, short))


def test_size_defaults_to_the_model_size():
    assert resolve_size(None, DEFAULTS) == (256, 256)
    assert resolve_size("auto", DEFAULTS) == (256, 256)


def test_size_is_width_then_height():
    assert resolve_size("128x64", DEFAULTS) == (128, 64)


@pytest.mark.parametrize("size", ["250x256", "256x100", "8x8", "0x256"])
def test_size_must_follow_the_architecture_rule(size):
    with pytest.raises(VLLMValidationError) as info:
        resolve_size(size, DEFAULTS)
    assert info.value.parameter == "size"
    assert "multiples of 16" in str(info.value)


def test_size_is_bounded():
    with pytest.raises(VLLMValidationError) as info:
        resolve_size("2048x2048", DEFAULTS)
    assert "too large" in str(info.value)


def test_size_is_within_the_side_the_model_can_position():
    """SD3's learned position table (the tiny SD3's 48 positions x 2x2 patches x VAE 8):
    a size within the pixel limit whose side is longer is refused, naming the bound."""
    sd3 = dataclasses.replace(DEFAULTS, max_side=768)
    assert resolve_size("768x256", sd3) == (768, 256)
    with pytest.raises(VLLMValidationError) as info:
        resolve_size("1024x256", sd3)
    assert info.value.parameter == "size"
    assert "at most 768 pixels per side" in str(info.value)


@pytest.mark.parametrize(
    ("image", "max_side", "planned"),
    [
        ((8, 2_097_152), None, (16, 262_144)),  # the PNG: 16x1048576 before
        ((8, 2_097_152), 98_304, (16, 98_304)),  # Qwen-Image's side (its RoPE table)
        ((2_097_152, 8), 98_304, (98_304, 16)),
        ((300, 200), None, (288, 192)),  # within both: rounded down to 16s
        ((4000, 1000), 768, (768, 192)),  # a side beyond SD3's table: scaled to fit it
        ((20_000, 2_500), None, (5792, 720)),  # at 8:1, scaled to the pixel limit
    ],
)
def test_an_auto_size_is_within_the_limits_after_every_rounding(image, max_side, planned):
    defaults = dataclasses.replace(DEFAULTS, max_pixels=2048 * 2048, max_side=max_side)
    assert input_size(image, defaults) == planned


def test_every_planned_size_is_a_size_the_model_accepts():
    """For input sizes from 1 pixel to far past every limit, and aspect ratios up to 10:1: the
    planned size is one `resolve_size` accepts (multiples of 16, pixels, sides)."""
    for defaults in (
        DEFAULTS,
        dataclasses.replace(DEFAULTS, max_side=768),
        dataclasses.replace(DEFAULTS, max_pixels=1000),  # 16x62 and 62x16 round past it
    ):
        for short in (1, 7, 15, 16, 17, 100, 999, 1024, 3000, 40_000):
            for ratio in (1, 1.5, 3, 7.9, 8, 10):
                long = int(short * ratio)
                for image in ((short, long), (long, short)):
                    width, height = input_size(image, defaults)
                    assert resolve_size(f"{width}x{height}", defaults) == (width, height), image


def test_seeds_count_up_from_the_request_seed():
    assert image_seeds(41, 3) == (41, 42, 43)


def test_seeds_wrap_into_torch_range():
    assert image_seeds(2**63 - 1, 2) == (2**63 - 1, 2**63)
    assert image_seeds(-1, 2) == (2**64 - 1, 0)


def test_random_seeds_differ_between_requests_and_images():
    first, second = image_seeds(None, 2), image_seeds(None, 2)
    assert len(set(first)) == 2
    assert first != second


def test_seedless_requests_draw_from_the_servers_seeded_source():
    """As vLLM's `--seed`: the same run of seedless requests after a restart, yet each request
    (and image) its own seed."""
    source, after_restart = random.Random(0), random.Random(0)
    run = [image_seeds(None, 2, source) for _ in range(3)]
    assert run == [image_seeds(None, 2, after_restart) for _ in range(3)]
    assert len({seed for seeds in run for seed in seeds}) == 6
    assert run != [image_seeds(None, 2, random.Random(1)) for _ in range(3)]
    assert image_seeds(5, 1, source) == (5,)  # a request's own seed wins


def test_lora_scale_needs_an_adapter_and_reaches_the_engine():
    adapter = LoRAAdapter("style", 3, "/adapters/style")
    chosen = ImageGenerationRequest(prompt="p", model="style", lora_scale=0.5)
    request = to_engine_request(chosen, MappingContext("id", DEFAULTS, lora=adapter))
    assert request.loras == (ScaledAdapter(adapter, 0.5),)
    plain = to_engine_request(
        ImageGenerationRequest(prompt="p", model="style"),
        MappingContext("id", DEFAULTS, lora=adapter),
    )
    assert plain.loras == (ScaledAdapter(adapter, 1.0),)
    with pytest.raises(VLLMValidationError) as info:
        to_engine_request(
            ImageGenerationRequest(prompt="p", lora_scale=0.5), MappingContext("id", DEFAULTS)
        )
    assert info.value.parameter == "lora_scale"


def test_mapping_applies_defaults():
    request = to_engine_request(
        ImageGenerationRequest(prompt="a cat"), MappingContext("id-1", DEFAULTS)
    )
    assert (request.width, request.height) == (256, 256)
    assert request.num_inference_steps == 4
    assert request.true_cfg_scale == 4.0
    assert request.guidance_scale is None
    assert request.negative_prompt is None
    assert request.num_images == 1
    assert request.request_id == "id-1"


def test_mapping_passes_every_extension_through():
    request = to_engine_request(
        ImageGenerationRequest(
            prompt="a cat",
            negative_prompt="blurry",
            n=3,
            size="128x64",
            num_inference_steps=7,
            guidance_scale=2.5,
            true_cfg_scale=6.0,
            seed=10,
        ),
        MappingContext("id-2", DEFAULTS),
    )
    assert request.prompt == "a cat"
    assert request.negative_prompt == "blurry"
    assert request.seeds == (10, 11, 12)
    assert (request.width, request.height) == (128, 64)
    assert request.num_inference_steps == 7
    assert request.guidance_scale == 2.5
    assert request.true_cfg_scale == 6.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("background", "transparent"),
        ("style", "vivid"),
        ("style", "natural"),
        ("moderation", "auto"),
        ("complexity", "high"),
        ("frame_count", 8),
        ("frame_duration_ms", 100),
        ("svg", {"mode": "outline"}),
    ],
)
def test_unsupported_options_name_their_field(field, value):
    error = refusal(ImageGenerationRequest, **{field: value})
    assert error.param == field
    assert "not supported" in error.message


def refusal(model: type[ImageGenerationRequest], **fields: Any) -> ErrorInfo:
    """What a client reads when `model` refuses `fields` as it is parsed (the request alone
    decides: no model defaults or limits are needed)."""
    with pytest.raises((VLLMValidationError, ValidationError)) as info:
        model.model_validate({"prompt": "p", **fields})
    answer = error_response(info.value).error
    assert answer.code == 400 and answer.type == "BadRequestError"
    return answer


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"stream": True, "n": 2},
            "n",
            "stream returns one image (its events carry no image index): send n=1.",
        ),
        (
            {"stream": True, "response_format": "url"},
            "response_format",
            "stream sends its images inline: use response_format 'b64_json'.",
        ),
        ({"partial_images": 2}, "partial_images", "partial_images needs stream: true."),
        (
            {"background": "transparent"},
            "background",
            "background 'transparent' is not supported: this model generates opaque images.",
        ),
        (
            {"moderation": "auto"},
            "moderation",
            "moderation 'auto' is not supported: this server moderates no content. Send 'low' "
            "or leave it out.",
        ),
    ],
)
def test_request_only_refusals_are_made_as_the_request_is_parsed(fields, param, message):
    for model in (ImageGenerationRequest, ImageEditRequest, ImageVariationRequest):
        error = refusal(model, **fields)
        assert (error.param, error.message) == (param, f"{message} (parameter={param})")


@pytest.mark.parametrize("field", ["input_fidelity", "markup"])
def test_edits_refuse_openais_fidelity_fields_by_name(field):
    value = "high" if field == "input_fidelity" else {"shapes": []}
    for model in (ImageEditRequest, ImageVariationRequest):
        error = refusal(model, **{field: value})
        assert error.param == field and "use strength (0-1)" in error.message
    with pytest.raises(ValidationError):  # not a field of generations at all
        ImageGenerationRequest.model_validate({"prompt": "p", field: value})


def test_a_fields_own_error_comes_before_a_refusal():
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate({"prompt": "p", "n": 11, "stream": True})
    assert error_response(info.value).error.param == "n"
    assert "less than or equal to 10" in error_response(info.value).error.message


@pytest.mark.parametrize(
    ("quality", "steps"),
    [
        (None, 8),
        ("auto", 8),
        ("standard", 8),
        ("high", 8),
        ("low", 2),
        ("medium", 4),
        ("hd", 12),
        ("xhigh", 12),
        ("max", 16),
    ],
)
def test_quality_is_a_share_of_the_default_steps(quality, steps):
    defaults = dataclasses.replace(DEFAULTS, num_inference_steps=8)
    request = ImageGenerationRequest(prompt="p", quality=quality)
    assert to_engine_request(request, MappingContext("id", defaults)).num_inference_steps == steps


def test_quality_keeps_steps_between_1_and_200():
    few = dataclasses.replace(DEFAULTS, num_inference_steps=1)
    many = dataclasses.replace(DEFAULTS, num_inference_steps=150)
    low = to_engine_request(
        ImageGenerationRequest(prompt="p", quality="low"), MappingContext("i", few)
    )
    top = to_engine_request(
        ImageGenerationRequest(prompt="p", quality="max"), MappingContext("i", many)
    )
    assert (low.num_inference_steps, top.num_inference_steps) == (1, 200)


def test_a_model_that_needs_two_steps_refuses_one_and_quality_gives_it_two():
    needs_two = dataclasses.replace(DEFAULTS, num_inference_steps=4, min_steps=2)
    low = to_engine_request(
        ImageGenerationRequest(prompt="p", quality="low"), MappingContext("i", needs_two)
    )
    assert low.num_inference_steps == 2  # 25 % of 4 is 1: raised to the model's minimum
    one = ImageGenerationRequest(prompt="p", num_inference_steps=1)
    with pytest.raises(VLLMValidationError, match="at least 2") as raised:
        to_engine_request(one, MappingContext("i", needs_two))
    assert raised.value.parameter == "num_inference_steps"


def test_explicit_steps_win_over_quality():
    request = ImageGenerationRequest(prompt="p", quality="low", num_inference_steps=30)
    assert to_engine_request(request, MappingContext("id", DEFAULTS)).num_inference_steps == 30


def test_moderation_low_and_an_opaque_background_are_honoured():
    request = ImageGenerationRequest(prompt="p", moderation="low", background="opaque")
    assert to_engine_request(request, MappingContext("id", DEFAULTS)).prompt == "p"


def test_partial_images_need_an_engine_that_decodes_previews():
    request = ImageGenerationRequest(prompt="p", stream=True, partial_images=2)
    with pytest.raises(VLLMValidationError) as info:
        to_engine_request(request, MappingContext("id", DEFAULTS))  # e.g. the vllm-omni engine
    assert info.value.parameter == "partial_images"
    previews = dataclasses.replace(DEFAULTS, supports_partial_images=True)
    assert to_engine_request(request, MappingContext("id", previews)).partial_images == 2
    plain = ImageGenerationRequest(prompt="p", stream=True)
    assert to_engine_request(plain, MappingContext("id", DEFAULTS)).partial_images == 0


def test_an_edit_maps_its_input_image_and_strength():
    from PIL import Image

    from vllm_omni_images.images.edits import ImageInputs

    context = MappingContext("id", DEFAULTS)
    with pytest.raises(VLLMValidationError) as missing:
        to_engine_request(ImageEditRequest(prompt="p"), context)
    assert missing.value.parameter == "image"
    inputs = ImageInputs([Image.new("RGB", (300, 200))], None)
    edit = to_engine_request(ImageEditRequest(prompt="p", strength=0.5), context, inputs)
    assert (edit.width, edit.height, edit.strength) == (288, 192, 0.5)  # rounded down to 16s
    with pytest.raises(VLLMValidationError, match="leaves none of the 4") as weak:
        to_engine_request(ImageEditRequest(prompt="p", strength=1e-20), context, inputs)
    assert weak.value.parameter == "strength"


def test_strength_is_refused_by_name_where_the_pipeline_never_reads_it():
    from PIL import Image

    from vllm_omni_images.images.edits import ImageInputs

    no_strength = MappingContext("id", dataclasses.replace(DEFAULTS, supports_strength=False))
    inputs = ImageInputs([Image.new("RGB", (64, 64))], None)
    with pytest.raises(VLLMValidationError, match="never reads it") as refused:
        to_engine_request(ImageEditRequest(prompt="p", strength=0.5), no_strength, inputs)
    assert refused.value.parameter == "strength"
    edit = to_engine_request(ImageEditRequest(prompt="p"), no_strength, inputs)
    assert edit.strength is None  # an edit without one is the pipeline's own


# Stacks: the adapter `model` names and those `lora` lists, applied together.

STYLE = LoRAAdapter("style", 3, "/adapters/style")
INK = LoRAAdapter("ink", 1, "/adapters/ink")
FAST_ADAPTER = LoRAAdapter(
    "lightning", 2, "/adapters/lightning", AdapterDefaults(num_inference_steps=8, true_cfg_scale=1)
)
TWO = ImageLimits(max_loras=2)


def stack_of(fields: dict[str, Any], model: LoRAAdapter | None, *listed: LoRAAdapter):
    """The stack of a request of `fields` whose `model` names `model` and whose `lora` lists
    `listed` (as serving resolves them), with two adapters a request."""
    request = ImageGenerationRequest.model_validate({"prompt": "p", **fields})
    return request_stack(request, MappingContext("id", DEFAULTS, TWO, model, listed))


def test_a_stack_is_the_model_adapter_at_lora_scale_and_the_listed_ones_at_theirs():
    chosen = {"model": "style", "lora_scale": 0.5, "lora": {"name": "ink", "scale": -0.3}}
    assert stack_of(chosen, STYLE, INK) == (ScaledAdapter(INK, -0.3), ScaledAdapter(STYLE, 0.5))
    listed = {"lora": [{"name": "style"}, {"lora_name": "ink", "lora_scale": 2}]}
    assert stack_of(listed, None, STYLE, INK) == (ScaledAdapter(INK, 2), ScaledAdapter(STYLE))
    assert stack_of({}, None) == ()


def test_the_order_of_a_stack_changes_nothing():
    forward = {"lora": [{"name": "style", "scale": 0.8}, {"name": "ink", "scale": 0.6}]}
    backward = {"lora": forward["lora"][::-1]}
    assert stack_of(forward, None, STYLE, INK) == stack_of(backward, None, INK, STYLE)
    assert stack_key(stack_of(forward, None, STYLE, INK)) == ((1, 0.6), (3, 0.8))


@pytest.mark.parametrize(
    ("fields", "model", "listed", "param", "message"),
    [
        ({"lora": [{"name": "style"}] * 2}, None, (STYLE, STYLE), "lora", "'style' is named twice"),
        ({"model": "style", "lora": {"name": "style"}}, STYLE, (STYLE,), "lora", "named twice"),
        (
            {"model": "style", "lora": [{"name": "ink"}, {"name": "lightning"}]},
            STYLE,
            (INK, FAST_ADAPTER),
            "lora",
            "applies 3 LoRA adapters and this server applies at most 2 together (--max-loras)",
        ),
        ({"lora_scale": 0.5, "lora": {"name": "ink"}}, None, (INK,), "lora_scale", "base model"),
    ],
    ids=["listed-twice", "in-model-and-lora", "over-max-loras", "lora-scale-on-base"],
)
def test_a_stack_is_refused_by_the_field_at_fault(fields, model, listed, param, message):
    with pytest.raises(VLLMValidationError, match=re.escape(message)) as refused:
        stack_of(fields, model, *listed)
    assert refused.value.parameter == param


def test_adapter_defaults_replace_the_models_and_the_request_wins():
    request = ImageGenerationRequest(prompt="p")
    assert stack_defaults(request, (), DEFAULTS) == (4, 4.0, None)
    fast = (ScaledAdapter(FAST_ADAPTER), ScaledAdapter(STYLE))
    assert stack_defaults(request, fast, DEFAULTS) == (8, 1, None)
    context = MappingContext("id", DEFAULTS, TWO, FAST_ADAPTER, (STYLE,))
    chosen = {"prompt": "p", "model": "lightning", "lora": {"name": "style"}}
    mapped = to_engine_request(ImageGenerationRequest.model_validate(chosen), context)
    assert (mapped.num_inference_steps, mapped.true_cfg_scale) == (8, 1)
    low = ImageGenerationRequest.model_validate(chosen | {"quality": "low"})
    assert to_engine_request(low, context).num_inference_steps == 2  # a quarter of 8
    own = chosen | {"num_inference_steps": 3, "true_cfg_scale": 2.5}
    mapped = to_engine_request(ImageGenerationRequest.model_validate(own), context)
    assert (mapped.num_inference_steps, mapped.true_cfg_scale) == (3, 2.5)


def test_adapters_that_disagree_on_a_default_leave_it_to_the_request():
    slow = LoRAAdapter("slow", 4, "/adapters/slow", AdapterDefaults(num_inference_steps=30))
    agreeing = LoRAAdapter("same", 5, "/adapters/same", AdapterDefaults(num_inference_steps=8))
    both = (ScaledAdapter(FAST_ADAPTER), ScaledAdapter(slow))
    with pytest.raises(VLLMValidationError, match=r"different values \(8 and 30\)") as refused:
        stack_defaults(ImageGenerationRequest(prompt="p"), both, DEFAULTS)
    assert refused.value.parameter == "num_inference_steps"
    chosen = ImageGenerationRequest(prompt="p", num_inference_steps=12)
    assert stack_defaults(chosen, both, DEFAULTS)[1:] == (1, None)
    same = (ScaledAdapter(FAST_ADAPTER), ScaledAdapter(agreeing))
    assert stack_defaults(ImageGenerationRequest(prompt="p"), same, DEFAULTS)[0] == 8
