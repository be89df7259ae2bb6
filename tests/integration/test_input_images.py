"""Edits and variations hand the engine their input images as a photo viewer shows them
(`images/input_images.py`): EXIF orientation, 16-bit grey, palettes, CMYK and transparency, for
the image and the mask, sent as files or fetched from an allowed host. Checked on the
`EngineRequest` a recording runner receives (`FakeRunner`: no model); the tiny engine's own
edit of a rotated photo is in test_image_edits.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.engines import FakeRunner
from tests.support.image_host import serve_files
from tests.support.images import encoded, quadrants, stored_as

from .conftest import AppFactory
from .helpers import assert_openai_error, http_client

STEPS = {"prompt": "a red fox", "num_inference_steps": "2"}
GREYS_16 = np.array([[0, 128, 129, 32768, 65280, 65535]], np.uint16)
GREYS_8 = np.array([[0, 0, 1, 128, 254, 255]], np.uint8)
"""round(v / 257): how the 16-bit values show on an 8-bit screen."""


def rotated_photo(orientation: int = 6) -> bytes:
    """A JPEG as a phone stores a photo taken sideways: 32x64 pixels, shown 64x32."""
    return encoded(stored_as(quadrants(64, 32), orientation), "JPEG", orientation=orientation)


def left_half_mask(width: int = 64, height: int = 32) -> Image.Image:
    """OpenAI's mask, drawn on the image as displayed: its left half transparent (edit)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


def left_half_white(width: int = 64, height: int = 32) -> np.ndarray:
    """The engine's mask for `left_half_mask`: white (change) on the left half."""
    expected = np.zeros((height, width), np.uint8)
    expected[:, : width // 2] = 255
    return expected


def as_grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def palette_png() -> tuple[bytes, np.ndarray]:
    image = Image.new("P", (4, 1))
    image.putpalette([250, 10, 10, 10, 250, 10, 10, 10, 250])
    image.putdata([0, 1, 2, 1])
    shown = np.array([[[250, 10, 10], [255, 255, 255], [10, 10, 250], [255, 255, 255]]])
    return encoded(image, "PNG", transparency=1), shown


INPUTS = {
    "16-bit grey": (encoded(Image.fromarray(GREYS_16)), as_grey_rgb(GREYS_8), 0),
    "16-bit grey, a transparent value": (
        encoded(Image.fromarray(GREYS_16), transparency=32768),
        as_grey_rgb(np.array([[0, 0, 1, 255, 254, 255]], np.uint8)),
        0,
    ),
    "palette, a transparent entry": (*palette_png(), 0),
    "grey and alpha": (
        encoded(Image.new("LA", (4, 2), (60, 0))),
        np.full((2, 4, 3), 255, np.uint8),
        0,
    ),
    "RGBA, half transparent": (
        encoded(Image.new("RGBA", (4, 2), (0, 0, 200, 128))),
        np.full((2, 4, 3), (127, 127, 227), np.uint8),
        1,
    ),
    "bilevel": (encoded(Image.new("1", (4, 2), 1)), np.full((2, 4, 3), 255, np.uint8), 0),
    "grey": (encoded(Image.new("L", (4, 2), 90)), np.full((2, 4, 3), 90, np.uint8), 0),
    "CMYK JPEG": (
        encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95),
        np.full((8, 8, 3), (255, 0, 0), np.uint8),
        3,
    ),
}


@pytest.fixture
async def recorded(make_app: AppFactory) -> AsyncIterator[tuple[httpx.AsyncClient, FakeRunner]]:
    runner = FakeRunner()
    async with http_client(await make_app(runner)) as http:
        yield http, runner


async def post(
    http: httpx.AsyncClient,
    image: bytes,
    mask: bytes | None = None,
    route: str = "edits",
    image_type: str = "image/jpeg",
) -> httpx.Response:
    files = {"image": ("photo", image, image_type)}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    data = STEPS if route == "edits" else {"num_inference_steps": "2"}
    return await http.post(f"/v1/images/{route}", data=data, files=files)


def received(runner: FakeRunner) -> tuple[np.ndarray, Image.Image | None]:
    """The image (as an array) and the mask of the last request the engine ran."""
    request = runner.batches[-1][0]
    assert request.image is not None and request.image.mode == "RGB"
    return np.asarray(request.image, np.int16), request.mask


@pytest.mark.parametrize("route", ["edits", "variations"])
async def test_a_rotated_photo_is_edited_upright_with_a_mask_drawn_on_it_as_displayed(
    recorded: tuple[httpx.AsyncClient, FakeRunner], route: str
) -> None:
    http, runner = recorded
    mask = encoded(left_half_mask()) if route == "edits" else None
    response = await post(http, rotated_photo(), mask, route)  # was a 400: "mask is 32x64 ..."
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "64x32"  # size auto: the displayed size
    image, engine_mask = received(runner)
    assert image.shape == (32, 64, 3)
    assert np.abs(image - np.asarray(quadrants(64, 32), np.int16)).mean() < 6
    if route == "edits":
        assert engine_mask is not None and engine_mask.mode == "L"
        assert np.array_equal(np.asarray(engine_mask), left_half_white())


@pytest.mark.parametrize("orientation", [3, 5, 8])
async def test_a_mask_is_turned_upright_by_its_own_orientation(
    recorded: tuple[httpx.AsyncClient, FakeRunner], orientation: int
) -> None:
    http, runner = recorded
    mask = encoded(stored_as(left_half_mask(), orientation), orientation=orientation)
    response = await post(http, rotated_photo(), mask)
    assert response.status_code == 200, response.text
    _, engine_mask = received(runner)
    assert engine_mask is not None
    assert np.array_equal(np.asarray(engine_mask), left_half_white())


@pytest.mark.parametrize("name", INPUTS)
async def test_each_kind_of_input_reaches_the_engine_as_shown_on_white(
    recorded: tuple[httpx.AsyncClient, FakeRunner], name: str
) -> None:
    http, runner = recorded
    data, shown, tolerance = INPUTS[name]
    response = await post(http, data, route="variations")
    assert response.status_code == 200, response.text
    image, _ = received(runner)
    assert np.abs(image - shown).max() <= tolerance  # a 16-bit PNG was 98 % white


def one_transparent_pixel_masks() -> dict[str, bytes]:
    """4x2 PNG masks in each mode with transparency, transparent at (0, 0) only."""
    grey_alpha = Image.new("LA", (4, 2), (0, 255))
    grey_alpha.putpixel((0, 0), (0, 0))
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    wide = np.full((2, 4), 1000, np.uint16)
    wide[0, 0] = 4000  # above 255: Pillow's own conversion compared clipped values
    palette = Image.new("P", (4, 2), 1)
    palette.putpalette([0, 0, 0, 0, 0, 0])
    palette.putpixel((0, 0), 0)
    return {
        "LA": encoded(grey_alpha),
        "RGBA": encoded(rgba),
        "16-bit grey, a transparent value": encoded(Image.fromarray(wide), transparency=4000),
        "palette, a transparent entry": encoded(palette, transparency=0),
    }


MASKS = one_transparent_pixel_masks()


@pytest.mark.parametrize("name", MASKS)
async def test_a_masks_transparency_is_the_area_to_edit_in_each_png_mode(
    recorded: tuple[httpx.AsyncClient, FakeRunner], name: str
) -> None:
    http, runner = recorded
    image = encoded(Image.new("RGB", (4, 2), (10, 20, 30)))
    response = await post(http, image, MASKS[name], image_type="image/png")
    assert response.status_code == 200, response.text
    _, engine_mask = received(runner)
    assert engine_mask is not None
    assert np.asarray(engine_mask).tolist() == [[255, 0, 0, 0], [0, 0, 0, 0]]  # (0, 0) only


@pytest.fixture(scope="module")
def photo_host() -> Iterator[str]:
    """A rotated photo at /photo.jpg, its mask at /mask.png, and no image at /notes.txt."""
    bodies = {
        "/photo.jpg": rotated_photo(),
        "/mask.png": encoded(left_half_mask()),
        "/notes.txt": b"shopping list: eggs, milk",
    }
    with serve_files(bodies) as url:
        yield url


async def test_fetched_images_are_read_as_uploads_are(
    make_app: AppFactory, photo_host: str
) -> None:
    runner = FakeRunner()
    app = await make_app(runner, ["--allowed-media-domains", "127.0.0.1"])
    async with http_client(app) as http:
        fields = {**STEPS, "image": f"{photo_host}/photo.jpg", "mask": f"{photo_host}/mask.png"}
        response = await http.post("/v1/images/edits", data=fields)
        assert response.status_code == 200, response.text
        image, engine_mask = received(runner)
        assert np.abs(image - np.asarray(quadrants(64, 32), np.int16)).mean() < 6
        assert engine_mask is not None
        assert np.array_equal(np.asarray(engine_mask), left_half_white())
        for parameter in ("image", "mask"):
            sent = {**fields, parameter: f"{photo_host}/notes.txt"}
            response = await http.post("/v1/images/edits", data=sent)
            error = assert_openai_error(response, 400, parameter)
            assert error["message"].startswith(
                f"{parameter} is not a PNG, JPEG or WebP image (its bytes are none of these "
                "formats)."
            )
    assert len(runner.batches) == 1


@pytest.mark.parametrize("parameter", ["image", "mask"])
async def test_an_upload_that_is_no_image_is_a_400_without_internals(
    recorded: tuple[httpx.AsyncClient, FakeRunner], parameter: str
) -> None:
    http, runner = recorded
    image = b"%PDF-1.7 not an image" if parameter == "image" else rotated_photo()
    mask = b"GIF89a" + bytes(32) if parameter == "mask" else None
    error = assert_openai_error(await post(http, image, mask), 400, parameter)
    assert "object at 0x" not in error["message"] and "BytesIO" not in error["message"]
    assert error["message"].startswith(f"{parameter} is not a PNG, JPEG or WebP image")
    assert runner.batches == []
