import json

import pytest
from pydantic import ValidationError
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.errors import describe_validation_errors, error_response
from vllm_omni_images.images.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_ASPECT_RATIO,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ImageObject,
    ImageUsage,
    ImageVariationRequest,
    UsageTokenDetails,
)
from vllm_omni_images.images.response_formats import default_response_format


def error_fields(exc: ValidationError) -> set[str]:
    return {str(error["loc"][-1]) for error in exc.errors()}


def test_defaults_follow_openai():
    request = ImageGenerationRequest(prompt="a cat")
    assert request.n == 1
    assert request.size is None
    assert request.response_format is None  # the server decides (default_response_format)
    assert request.output_format == "png"
    assert request.model is None
    assert request.seed is None
    assert request.num_inference_steps is None


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_prompt_must_have_text(prompt):
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest(prompt=prompt)
    assert "prompt" in error_fields(info.value)


def test_prompt_is_required():
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate({"n": 1})
    assert "prompt" in error_fields(info.value)


@pytest.mark.parametrize(
    ("field", "valid", "invalid"),
    [
        ("n", [1, 10], [0, 11, -1]),
        ("num_inference_steps", [1, 200], [0, 201]),
        ("guidance_scale", [0.0, 20.0, 7.5], [-0.1, 20.01]),
        ("true_cfg_scale", [0.0, 20.0, 4.0], [-1.0, 21.0]),
        ("seed", [INT64_MIN, 0, INT64_MAX], [INT64_MIN - 1, INT64_MAX + 1]),
        ("output_compression", [0, 100], [-1, 101]),
    ],
)
def test_numeric_bounds(field, valid, invalid):
    for value in valid:
        assert getattr(ImageGenerationRequest(prompt="p", **{field: value}), field) == value
    for value in invalid:
        with pytest.raises(ValidationError) as info:
            ImageGenerationRequest(prompt="p", **{field: value})
        assert field in error_fields(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("response_format", "png"),
        ("output_format", "gif"),
        ("quality", "ultra"),
        ("style", "cartoon"),
        ("background", "green"),
        ("n", "many"),
        ("prompt", 42),
    ],
)
def test_enums_and_types_are_checked(field, value):
    payload = {"prompt": "p", field: value}
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate(payload)
    assert field in error_fields(info.value)


@pytest.mark.parametrize("size", ["256x256", "1024x768", "64X128", " 512 x 512 ", "auto"])
def test_size_accepts_width_x_height_and_auto(size):
    assert ImageGenerationRequest(prompt="p", size=size).size == size


@pytest.mark.parametrize("size", ["256", "256x", "x256", "256*256", "-256x256", "1.5x2", "big"])
def test_size_rejects_other_shapes(size):
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest(prompt="p", size=size)
    assert "size" in error_fields(info.value)


def test_a_field_this_api_does_not_know_is_refused_by_name():
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate({"prompt": "p", "temperature": 0.7})
    assert "temperature" in error_fields(info.value)
    assert ImageGenerationRequest.model_validate({"prompt": "p", "moderation": "low"}).prompt


def test_the_newest_sdk_fields_are_all_known() -> None:
    """Every field of the installed openai SDK's `images.generate` is one this API handles
    (honours or refuses by name), so an SDK upgrade that adds one fails here first."""
    from openai.types.image_generate_params import ImageGenerateParamsBase

    sdk_fields = set(ImageGenerateParamsBase.__annotations__)
    assert sdk_fields <= set(ImageGenerationRequest.model_fields)


USAGE = ImageUsage(
    input_tokens=7,
    input_tokens_details=UsageTokenDetails(text_tokens=7),
    output_tokens=16,
    output_tokens_details=UsageTokenDetails(image_tokens=16),
    total_tokens=23,
)


def test_response_shape():
    def response(image: ImageObject) -> ImageGenerationResponse:
        return ImageGenerationResponse(
            data=[image], size="64x64", output_format="png", quality="high", usage=USAGE
        )

    dumped = response(ImageObject(b64_json="abc")).model_dump(exclude_none=True)
    assert set(dumped) == {
        "created", "data", "size", "output_format", "quality", "background", "usage"
    }  # fmt: skip
    assert dumped["data"] == [{"b64_json": "abc"}]
    url = "http://h/images/files/x.png"
    assert response(ImageObject(url=url)).model_dump(exclude_none=True)["data"] == [{"url": url}]
    assert isinstance(dumped["created"], int) and dumped["created"] > 1_700_000_000


def test_the_response_is_the_openai_sdks_images_response():
    """Every field, usage's details included, as the installed openai SDK's model has it."""
    from openai.types.images_response import ImagesResponse

    response = ImageGenerationResponse(
        data=[ImageObject(b64_json="abc")],
        size="64x64",
        output_format="png",
        quality="high",
        usage=USAGE,
    ).model_dump(exclude_none=True)
    parsed = ImagesResponse.model_validate(response)
    assert parsed.model_dump(exclude_none=True) == response
    assert parsed.usage is not None and parsed.usage.input_tokens_details.text_tokens == 7


@pytest.mark.parametrize(
    ("setting", "model", "expected"),
    [
        ("auto", "dall-e-2", "url"),
        ("auto", "dall-e-3", "url"),
        ("auto", "gpt-image-1", "b64_json"),
        ("auto", "tiny-qwen-image", "b64_json"),
        ("auto", "my-dall-e-2", "b64_json"),
        ("b64_json", "dall-e-3", "b64_json"),
        ("url", "gpt-image-1", "url"),
    ],
)
def test_the_default_response_format_follows_openai_by_model_name(setting, model, expected):
    assert default_response_format(setting, model) == expected


@pytest.mark.parametrize("model", [ImageGenerationRequest, ImageEditRequest, ImageVariationRequest])
def test_every_field_refuses_a_lone_surrogate_by_name(model):
    """Valid JSON can escape half a surrogate pair (`"\\ud800"`): no tokenizer can read it
    (it cannot be encoded as UTF-8), so any field holding one is a 400 naming that field,
    whatever its type, before any work is queued."""
    for field in model.model_fields:
        for text in ("\ud800", "a fox \udfff", "\ude00\ud83d"):
            payload = {"prompt": "p", field: text}
            with pytest.raises(ValidationError) as info:
                model.model_validate(payload)
            message, param = describe_validation_errors(info.value.errors())
            assert param is not None and param.endswith(field), (field, message)
            assert "lone surrogate" in message
            with pytest.raises(ValidationError):  # a form's field alike
                model.model_validate(payload, strict=False)
    # A whole pair, as JSON escapes a character outside the BMP, is that character.
    pair = model.model_validate(json.loads('{"prompt": "a", "negative_prompt": "\\ud83e\\udd8a"}'))
    assert pair.negative_prompt == "\U0001f98a"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", "2"),
        ("n", 2.0),
        ("n", True),
        ("stream", "yes"),
        ("stream", "true"),
        ("stream", 1),
        ("seed", "7"),
        ("num_inference_steps", "4"),
        ("guidance_scale", "1.5"),
        ("output_compression", 50.0),
        ("partial_images", False),
    ],
)
def test_a_json_body_is_held_to_each_fields_type(field, value):
    """As OpenAI's API: a value of the wrong JSON type is a 400 naming the field, not coerced."""
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate({"prompt": "p", field: value})
    assert field in error_fields(info.value)


def test_a_float_field_takes_an_int_and_a_form_field_is_parsed():
    request = ImageEditRequest.model_validate(
        {"prompt": "p", "guidance_scale": 1, "true_cfg_scale": 4, "strength": 1, "lora_scale": 0}
    )
    assert (request.guidance_scale, request.strength) == (1.0, 1.0)
    assert isinstance(request.true_cfg_scale, float)
    form = {"prompt": "p", "n": "2", "stream": "false", "seed": "-3", "guidance_scale": "1.5"}
    parsed = ImageEditRequest.model_validate(form, strict=False)  # as edits.read_multipart does
    assert (parsed.n, parsed.stream, parsed.seed, parsed.guidance_scale) == (2, False, -3, 1.5)


@pytest.mark.parametrize("model", [ImageGenerationRequest, ImageEditRequest])
def test_a_size_more_elongated_than_8_to_1_is_refused_with_the_bound(model):
    for size in ("64x512", "512x64", "16x128", "1024x1024"):
        assert model.model_validate({"prompt": "p", "size": size}).size == size
    for size in ("64x528", "528x64", "16x13107", "8x2048"):
        with pytest.raises((ValidationError, VLLMValidationError)) as info:
            model.model_validate({"prompt": "p", "size": size})
        error = error_response(info.value).error
        assert (error.code, error.param) == (400, "size")
        assert f"at most {MAX_ASPECT_RATIO} times its shortest" in error.message
