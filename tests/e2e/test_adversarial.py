"""Issue 31's quick adversarial cases against the shared live `vllm serve` (the same requests
`python -m benchmarks.adversarial` sends for docs/reliability.md's table), with the contract the
issue asks for: a bad field is a 400 that names it, before any work; a good request beside a
bad one gets its image; input images are read as a photo viewer shows them; LoRA names follow
one pattern and errors leak neither files nor paths; OpenAI's error shape everywhere."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from testing import adversarial_cases as cases
from testing import adversarial_inputs as inputs
from testing import adversarial_lora as lora
from testing.adversarial_cases import Row, Target
from tests.integration.helpers import assert_openai_error

from .live_server import AUTH

pytestmark = pytest.mark.e2e

COLOUR_TOLERANCE = 4.0
"""Largest difference of a kept area's mean channel from what a viewer shows (JPEG rounding)."""


@pytest.fixture
def target(server: str, tmp_path: Path, tiny_loras: dict[str, Path]) -> Target:
    return Target(
        base_url=server,
        headers=AUTH,
        workdir=tmp_path,
        adapter_source=tiny_loras["other"],
        max_cpu_loras=2,  # conftest.py: --max-loras 2, and --max-cpu-loras defaults to it
        timeout_s=60,
    )


def response(row: Row) -> httpx.Response:
    assert row.response is not None, f"{row.case}: {row.status}"
    return row.response


def refused(row: Row, status: int = 400, param: str | None = None) -> dict:
    """The row's OpenAI error, after a short message if it is something else (an image)."""
    assert row.status == str(status), f"{row.case}: {row.status} {row.answer}"
    return assert_openai_error(response(row), status, param)


@pytest.mark.parametrize("field", ["negative_prompt", "prompt", "user"])
def test_a_lone_surrogate_is_a_400_naming_its_field(target: Target, field: str) -> None:
    (row,) = cases.surrogate_in(field)(target)
    refused(row, 400, field)


def test_a_good_request_queued_beside_a_bad_one_gets_its_image(target: Target) -> None:
    bad, good = cases.surrogate_beside_a_good_request(target)
    assert response(good).status_code == 200, good.answer
    assert len(response(good).json()["data"]) == 1
    refused(bad, 400, "negative_prompt")


def test_an_edit_whose_auto_size_the_model_cannot_position_is_a_400(target: Target) -> None:
    (row,) = cases.edit_size_auto(16, 131072)(target)
    error = refused(row)
    assert error["param"] in ("size", "image"), error


def test_exif_orientation_is_applied_to_the_image_and_the_mask_drawn_on_it(
    target: Target,
) -> None:
    (masked,) = cases.exif_mask_as_displayed(target)
    image = cases.first_image(response(masked))
    assert image is not None, masked.answer
    assert image.size == (32, 64)
    top = inputs.mean_rgb(image, cases.KEPT)
    assert all(abs(a - b) <= COLOUR_TOLERANCE for a, b in zip(top, inputs.RED, strict=True)), top
    (unmasked,) = cases.exif_without_mask(target)
    assert response(unmasked).json()["size"] == "32x64", unmasked.answer


def test_a_16_bit_grayscale_png_keeps_its_brightness(target: Target) -> None:
    data, shown = inputs.gray16_png()
    result, kept = cases.kept_colour(target, data, "gray16.png")
    assert kept is not None, cases.describe(result[0])
    assert all(abs(channel - shown) <= COLOUR_TOLERANCE for channel in kept), (kept, shown)


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA"])
def test_palette_cmyk_and_la_inputs_keep_their_colours(target: Target, mode: str) -> None:
    data, shown = inputs.mode_png_or_jpeg(mode)
    result, kept = cases.kept_colour(target, data, "in.jpg" if mode == "CMYK" else "in.png")
    assert kept is not None, cases.describe(result[0])
    assert all(abs(a - b) <= COLOUR_TOLERANCE for a, b in zip(kept, shown, strict=True))


@pytest.mark.parametrize(
    "case",
    [
        lora.adapter_named_like_the_base,
        lora.adapter_named_with_a_slash,
        lora.adapter_named_5000_characters,
    ],
)
def test_adapter_names_outside_the_pattern_are_refused(target: Target, case) -> None:
    before = lora.model_ids(target)
    (row,) = case(target)
    refused(row, 400, "lora_name")
    assert lora.model_ids(target) == before


def test_adapter_errors_do_not_tell_a_missing_path_from_a_file_nor_echo_them(
    target: Target,
) -> None:
    missing, existing = lora.adapter_path_probes(target)
    for row, path in ((missing, "/nonexistent-adversarial/adapter"), (existing, "/etc/hostname")):
        error = refused(row)
        assert path not in error["message"] and "'probe'" in error["message"]
    assert missing.answer == existing.answer


def test_adapter_errors_do_not_echo_the_files_header(target: Target) -> None:
    (row,) = lora.adapter_header_secret(target)
    refused(row)
    assert inputs.SECRET not in response(row).text


def test_an_evicted_adapter_whose_files_vanished_is_reported_by_name(target: Target) -> None:
    (row,) = lora.adapter_evicted_then_deleted(target)
    status = response(row).status_code
    assert 400 <= status < 500 or status == 503, f"{row.status} {row.answer}"
    assert "evicted" in refused(row, status)["message"]


def test_messages_hold_no_python_object_names(target: Target) -> None:
    (row,) = cases.unreadable_image_message(target)
    assert "<_io." not in refused(row, 400, "image")["message"]


def test_an_image_file_name_that_is_no_name_is_an_openai_404(target: Target) -> None:
    for row in cases.bad_file_names(target):
        refused(row, 404)


def test_head_on_an_image_url_answers_as_get(target: Target) -> None:
    (row,) = cases.head_on_an_image_url(target)
    assert response(row).status_code == 200, row.status
    assert response(row).headers["content-type"] == "image/png"


@pytest.mark.parametrize(("field", "value"), [("stream", "yes"), ("n", "2")])
def test_a_string_where_the_api_takes_a_boolean_or_number_is_a_400(
    target: Target, field: str, value: str
) -> None:
    (row,) = cases.wrong_json_type(field, value)(target)
    refused(row, 400, field)
