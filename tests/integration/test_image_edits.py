"""`/v1/images/edits` and `/v1/images/variations` through the official `openai` SDK, in-process
on the real tiny engine (its img2img and inpaint pipelines, built from the loaded one)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image

from tests.support.engines import ObservedRunner
from tests.support.image_host import serve_files
from tests.support.images import FAST_STEPS, encoded, png, quadrants, stored_as
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.images.limits import DEFAULT_LIMITS

from .conftest import AppFactory
from .helpers import assert_openai_error, http_client, pixels, sdk_client

FAST = {**FAST_STEPS, "seed": 5}


def source(width: int = 64, height: int = 64) -> Image.Image:
    """A picture with structure: horizontal stripes of two colours."""
    array = np.zeros((height, width, 3), np.uint8)
    array[::8] = (240, 200, 40)
    array[array.sum(axis=2) == 0] = (30, 60, 150)
    return Image.fromarray(array)


def noise() -> Image.Image:
    """An image that does not compress: its PNG is large enough to cut in the middle."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))


def left_half_mask(width: int = 64, height: int = 64) -> Image.Image:
    """OpenAI's convention: transparent pixels (the left half) are the ones to edit."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


def assert_different_images(
    result: ImagesResponse, count: int, shape: tuple[int, int, int]
) -> None:
    assert result.data is not None and len(result.data) == count
    arrays = [pixels(item.b64_json or "") for item in result.data]
    assert all(array.shape == shape for array in arrays)
    assert len({array.tobytes() for array in arrays}) == count  # n images differ


async def test_an_edit_with_a_mask_changes_only_the_masked_area(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, _ = served
    result = await sdk.images.edit(
        model="tiny-qwen-image",
        image=("photo.png", png(source()), "image/png"),
        mask=("mask.png", png(left_half_mask()), "image/png"),
        prompt="a red fox",
        extra_body=FAST,
    )
    assert result.data is not None and result.size == "64x64"
    edited = pixels(result.data[0].b64_json or "").astype(np.int16)
    original = np.asarray(source(), np.int16)
    masked_change = np.abs(edited[:, :32] - original[:, :32]).mean()
    kept_change = np.abs(edited[:, 33:] - original[:, 33:]).mean()
    assert masked_change > 10 and kept_change < 1


async def test_a_rotated_photo_is_edited_as_displayed_within_a_mask_drawn_on_it(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, _ = served
    displayed = quadrants(64, 32)  # a phone's sideways photo: stored 32x64, EXIF orientation 6
    photo = encoded(stored_as(displayed, 6), "JPEG", orientation=6, quality=95)
    result = await sdk.images.edit(
        model="tiny-qwen-image",
        image=("photo.jpg", photo, "image/jpeg"),
        mask=("mask.png", png(left_half_mask(64, 32)), "image/png"),
        prompt="a red fox",
        extra_body=FAST,
    )
    assert result.data is not None and result.size == "64x32"
    edited = pixels(result.data[0].b64_json or "").astype(np.int16)
    original = np.asarray(displayed, np.int16)
    assert np.abs(edited[:, :32] - original[:, :32]).mean() > 10
    assert np.abs(edited[:, 33:] - original[:, 33:]).mean() < 4  # kept, upright (JPEG's error)


async def test_an_edit_without_a_mask_keeps_the_input_size_rounded(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, _ = served
    result = await sdk.images.edit(
        model="tiny-qwen-image",
        image=("photo.png", png(source(70, 50)), "image/png"),
        prompt="a red fox",
        n=2,
        extra_body={**FAST, "strength": 0.9},
    )
    assert result.size == "64x48"  # multiples of 16, said so
    assert_different_images(result, 2, (48, 64, 3))


async def test_the_same_edit_and_seed_give_the_same_image(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, _ = served
    results = [
        await sdk.images.edit(
            model="tiny-qwen-image",
            image=("photo.png", png(source()), "image/png"),
            prompt="a red fox",
            extra_body=FAST,
        )
        for _ in range(2)
    ]
    first, second = (result.data[0].b64_json for result in results if result.data)
    assert first is not None and first == second


async def test_a_variation_gives_n_different_images_of_the_input(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, _ = served
    result = await sdk.images.create_variation(
        model="tiny-qwen-image",
        image=("photo.png", png(source()), "image/png"),
        n=2,
        size="256x256",
        extra_body={**FAST_STEPS, "seed": 3},
    )
    assert_different_images(result, 2, (256, 256, 3))


async def test_an_edit_can_answer_with_a_url(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, http = served
    result = await sdk.images.edit(
        model="tiny-qwen-image",
        image=("photo.png", png(source()), "image/png"),
        prompt="a red fox",
        response_format="url",
        extra_body=FAST,
    )
    assert result.data is not None and result.data[0].url is not None
    assert (await http.get(result.data[0].url)).headers["content-type"] == "image/png"


async def test_vllm_omnis_mask_image_name_and_a_data_url_image_work(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    _, http = served
    data_url = "data:image/png;base64," + base64.b64encode(png(source())).decode()
    response = await http.post(
        "/v1/images/edits",
        data={"prompt": "a red fox", "image": data_url, "num_inference_steps": "2"},
        files={"mask_image": ("mask.png", png(left_half_mask()), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "64x64"


def upload(content: bytes, name: str = "image") -> dict[str, tuple[str, bytes, str]]:
    return {name: ("in.png", content, "image/png")}


@pytest.mark.parametrize(
    ("files", "data", "status", "param"),
    [
        ({}, {"prompt": "p"}, 400, "image"),
        (upload(b"not an image at all"), {"prompt": "p"}, 400, "image"),
        (upload(png(noise())[:2000]), {"prompt": "p"}, 400, "image"),  # truncated PNG
        (upload(png(source())), {}, 400, "prompt"),
        (upload(png(source())), {"prompt": "p", "n": "11"}, 400, "n"),
        (upload(png(source())), {"prompt": "p", "strength": "2"}, 400, "strength"),
        # Found by the fuzzer: 4 steps x 5e-324 leaves no step to run (was diffusers' 500).
        (upload(png(source())), {"prompt": "p", "strength": "5e-324"}, 400, "strength"),
        (upload(png(source())), {"prompt": "p", "temperature": "1"}, 400, "temperature"),
        (
            upload(png(source())),
            {"prompt": "p", "image": "https://example.com/a.png"},
            400,
            "image",
        ),
    ],
)
async def test_bad_multipart_input_is_a_400_naming_the_part(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
    files: dict,
    data: dict,
    status: int,
    param: str,
) -> None:
    _, http = served
    response = await http.post("/v1/images/edits", data=data, files=files)
    assert_openai_error(response, status, param)


async def test_a_tiny_strength_that_still_leaves_one_step_edits(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    _, http = served
    # diffusers runs the last int-rounded steps x strength: 4 - int(4 - 4e-9) = 1 step.
    data = {"prompt": "p", "strength": "1e-9", "num_inference_steps": "4"}
    response = await http.post("/v1/images/edits", data=data, files=upload(png(source())))
    assert response.status_code == 200, response.text


async def test_bad_masks_are_400s(served: tuple[openai.AsyncOpenAI, httpx.AsyncClient]) -> None:
    _, http = served
    for mask in (left_half_mask(32, 32), source()):  # wrong size; no alpha channel
        response = await http.post(
            "/v1/images/edits",
            data={"prompt": "p"},
            files={
                "image": ("in.png", png(source()), "image/png"),
                "mask": ("mask.png", png(mask), "image/png"),
            },
        )
        assert_openai_error(response, 400, "mask")


async def test_too_many_or_too_large_images_are_refused_and_serving_goes_on(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, http = served
    # Ours to count, before any image is decoded (parts that are no images are refused for
    # their count); beyond the files a form may carry, the form parser's limit.
    for part in (png(source()), b"not an image"):
        two = [("image[]", ("in.png", part, "image/png"))] * 2
        response = await http.post("/v1/images/edits", data={"prompt": "p"}, files=two)
        error = assert_openai_error(response, 400, "image")
        assert error["message"].startswith("This model edits one image at a time; got 2.")
    for count in (DEFAULT_LIMITS.form_files, DEFAULT_LIMITS.form_files + 1, 40):
        many = [("image[]", ("in.png", png(source(16, 16)), "image/png"))] * count
        response = await http.post("/v1/images/edits", data={"prompt": "p"}, files=many)
        error = assert_openai_error(response, 400, "image")
        assert "This model edits one image at a time" in error["message"]
        if count <= DEFAULT_LIMITS.form_files:
            assert f"; got {count}." in error["message"]
        else:  # a flood: the form parser stops reading at its file limit
            assert "Too many files" in error["message"]
    huge = b"\x89PNG\r\n\x1a\n" + bytes(DEFAULT_LIMITS.max_input_bytes)
    response = await http.post("/v1/images/edits", data={"prompt": "p"}, files=upload(huge))
    assert_openai_error(response, 413)
    result = await sdk.images.generate(
        model="tiny-qwen-image", prompt="still serving", size="64x64", extra_body=FAST
    )
    assert result.data is not None and len(result.data) == 1


async def test_concurrent_edits_batch_and_each_keeps_its_own_input(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    runner = ObservedRunner(tiny_runner)
    app = await make_app(runner, ["--image-batch-delay-ms", "200"])
    sources = [source(), noise()]

    async def edit(sdk: openai.AsyncOpenAI, image: Image.Image) -> np.ndarray:
        result = await sdk.images.edit(
            model="tiny-qwen-image",
            image=("in.png", png(image), "image/png"),
            mask=("mask.png", png(left_half_mask()), "image/png"),
            prompt="a red fox",
            extra_body=FAST,
        )
        assert result.data is not None
        return pixels(result.data[0].b64_json or "").astype(np.int16)

    async with sdk_client(app) as sdk:
        alone = [await edit(sdk, image) for image in sources]
        together = await asyncio.gather(*(edit(sdk, image) for image in sources))
    for solo, batched, image in zip(alone, together, sources, strict=True):
        assert np.abs(solo - batched).max() <= 1  # batching only rounds
        kept = np.asarray(image, np.int16)[:, 33:]
        assert np.abs(batched[:, 33:] - kept).mean() < 1  # its own input, not its neighbour's
    assert runner.batches == [1, 1, 2]  # alone, alone, then one batch of both


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A local HTTP server with one PNG at /fox.png: a stand-in for a host on the internet."""
    with serve_files({"/fox.png": png(source())}) as url:
        yield url


async def test_an_image_url_is_fetched_only_from_hosts_the_operator_allowed(
    make_app: AppFactory, tiny_runner: DiffusersRunner, image_host: str
) -> None:
    edit = {"prompt": "a red fox", "image": f"{image_host}/fox.png", "num_inference_steps": "2"}
    for flags, status in [
        ([], 400),  # no --allowed-media-domains: nothing is fetched
        (["--allowed-media-domains", "images.example.com"], 400),  # another host
        (["--allowed-media-domains", "127.0.0.1"], 200),
    ]:
        async with http_client(await make_app(tiny_runner, flags)) as http:
            response = await http.post("/v1/images/edits", data=edit)
        if status == 200:
            assert response.status_code == 200, response.text
            assert response.json()["size"] == "64x64"
        else:
            error = assert_openai_error(response, 400, "image")
            assert "allowed" in error["message"]
