"""The request limits as flags, and what messages and logs echo of what a client sent."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.engine.base import ModelDefaults
from vllm_omni_images.images.errors import describe_validation_errors, error_response
from vllm_omni_images.images.limits import ImageLimits, MiB
from vllm_omni_images.images.protocol import ImageGenerationRequest
from vllm_omni_images.images.request_mapping import MappingContext, to_engine_request
from vllm_omni_images.server.cli_args import add_image_cli_args
from vllm_omni_images.server.endpoint import limits_from_args

DOCS = Path(__file__).resolve().parents[2] / "docs" / "image_api.md"
DEFAULTS = ModelDefaults(width=64, height=64, num_inference_steps=2, size_multiple=16)


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm serve")
    add_image_cli_args(parser)
    return parser.parse_args(list(flags))


def test_the_default_limits_are_the_flags_defaults() -> None:
    limits = limits_from_args(parse())
    assert limits == ImageLimits()
    assert limits.max_json_bytes == MiB
    assert limits.form_bytes == 81 * MiB  # an image and a mask of 20 MiB as data: URLs, 1 MiB
    assert limits.max_prompt_chars == 32_000
    assert limits.max_pixels is None  # the model's
    assert limits.max_request_pixels == 4 * 2048 * 2048
    assert (limits.max_input_images, limits.input_images) == (1, 1)  # the engines edit one
    assert limits.form_files == 4  # an image and a mask, twice over: a few too many are named
    assert limits.max_input_bytes == 20 * MiB
    assert limits.max_input_pixels == 4096 * 4096


def test_each_limit_is_a_flag() -> None:
    limits = limits_from_args(
        parse(
            "--image-max-json-mb", "0.5",
            "--image-max-form-mb", "8",
            "--image-max-prompt-chars", "77",
            "--image-max-pixels", "1024x512",
            "--image-max-request-pixels", "1000000",
            "--image-max-input-images", "2",
            "--image-max-input-mb", "3",
            "--image-max-input-pixels", "100x100",
        )
    )  # fmt: skip
    assert limits == ImageLimits(
        max_json_bytes=MiB // 2,
        max_form_bytes=8 * MiB,
        max_prompt_chars=77,
        max_pixels=1024 * 512,
        max_request_pixels=1_000_000,
        max_input_images=2,
        max_input_bytes=3 * MiB,
        max_input_pixels=10_000,
    )
    # Without its own flag, the form limit follows the inputs': one image and a mask.
    assert limits_from_args(parse("--image-max-input-mb", "1")).form_bytes == 5 * MiB


def test_more_input_images_than_the_engines_edit_is_said_not_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--image-max-input-images can only lower what the engines edit at once (one image): a
    larger value changes neither the count an edit may send nor the form limit, and the log
    says so; it is in the flag's help too."""
    with caplog.at_level(logging.WARNING, logger="vllm_omni_images.server.endpoint"):
        limits = limits_from_args(parse("--image-max-input-images", "4"))
    assert (limits.max_input_images, limits.input_images) == (4, 1)
    assert limits.form_bytes == ImageLimits().form_bytes
    assert "--image-max-input-images 4 is more than the engines edit at once (1)" in caplog.text
    caplog.clear()
    limits_from_args(parse("--image-max-input-images", "1"))
    assert not caplog.text
    parser = argparse.ArgumentParser(prog="vllm serve")
    add_image_cli_args(parser)
    [action] = [a for a in parser._actions if "--image-max-input-images" in a.option_strings]
    assert action.help is not None and "can only lower" in action.help


@pytest.mark.parametrize(
    "flags",
    [
        ["--image-max-json-mb", "0"],
        ["--image-max-form-mb", "-1"],
        ["--image-max-prompt-chars", "0"],
        ["--image-max-pixels", "banana"],
        ["--image-max-request-pixels", "0x10"],
        ["--image-max-input-images", "0"],
        ["--image-max-input-mb", "nan"],
        ["--image-max-input-pixels", "-5"],
    ],
)
def test_a_limit_that_allows_nothing_stops_the_command_line(flags: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*flags)


def test_every_image_flag_is_documented() -> None:
    """`docs/image_api.md`'s flags table names each `--help=ImageTask` flag."""
    parser = argparse.ArgumentParser(prog="vllm serve")
    add_image_cli_args(parser)
    docs = DOCS.read_text()
    table = docs[docs.index("## `vllm serve` flags") :]
    flags = [
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]
    missing = [flag for flag in flags if f"`{flag}" not in table]
    assert not missing


def test_pixels_per_image_and_per_request() -> None:
    limits = ImageLimits(max_pixels=64 * 64, max_request_pixels=2 * 64 * 64)
    ok = ImageGenerationRequest(prompt="p", size="64x64", n=2)
    assert to_engine_request(ok, MappingContext("id", DEFAULTS, limits)).num_images == 2
    for request, param in [
        (ImageGenerationRequest(prompt="p", size="64x80"), "size"),
        (ImageGenerationRequest(prompt="p", size="64x64", n=3), "n"),
        (ImageGenerationRequest(prompt="p", n=3), "n"),  # the model's default size
    ]:
        with pytest.raises(VLLMValidationError) as info:
            to_engine_request(request, MappingContext("id", DEFAULTS, limits))
        assert info.value.parameter == param
    # One image over the per-request limit names its size.
    with pytest.raises(VLLMValidationError) as info:
        to_engine_request(
            ImageGenerationRequest(prompt="p", size="64x64"),
            MappingContext("id", DEFAULTS, ImageLimits(max_request_pixels=100)),
        )
    assert info.value.parameter == "size"
    # Without --image-max-pixels the model's own limit holds.
    small_model = ModelDefaults(64, 64, 2, 16, max_pixels=32 * 32)
    with pytest.raises(VLLMValidationError):
        to_engine_request(
            ImageGenerationRequest(prompt="p", size="48x48"), MappingContext("id", small_model)
        )


def test_validation_errors_are_short_and_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate(
            {"prompt": "p", "size": "banana" * 5000, "num_inference_step": 3}
        )
    message, param = describe_validation_errors(info.value.errors())
    assert param == "size"
    assert "size must be 'WIDTHxHEIGHT'" in message and "(30000 characters)" in message
    assert "num_inference_step: this API has no such field" in message
    assert len(message) < 400
    response = error_response(info.value)
    assert response.error.code == 400 and response.error.param == "size"


def test_many_validation_errors_are_counted_not_listed() -> None:
    errors = [
        {"type": "missing", "loc": ("body", f"f{i}"), "msg": "Field required"} for i in range(50)
    ]
    message, param = describe_validation_errors(errors)
    assert param == "body.f0"
    assert message.count("Field required") == 5 and message.endswith("and 45 more")


def test_plain_text_and_json_errors() -> None:
    message, param = describe_validation_errors(["Unsupported Media Type: only JSON"])
    assert (message, param) == ("Unsupported Media Type: only JSON", None)
    json_error = {"type": "json_invalid", "loc": ("body", 7), "msg": "JSON decode error"}
    message, param = describe_validation_errors([{**json_error, "ctx": {"error": "Expecting"}}])
    assert param is None and re.fullmatch(
        r"The body is not valid JSON \(Expecting .* 7\)\.", message
    )
