"""`images/input_images.py`: input images read as a photo viewer shows them, each mode and
EXIF orientation built here with Pillow; expected pixels are computed from the formats' own
definitions (16-bit grey / 257, the EXIF orientation's words, white behind transparency)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms
from vllm.exceptions import VLLMValidationError

from tests.support.images import encoded, quadrants, stored_as
from vllm_omni_images.images.input_images import (
    alpha_channel,
    as_rgb,
    displayed_size,
    open_input,
)

LIMIT = 1 << 20
GREYS_16 = np.array([[0, 1, 128, 129, 257, 32768, 65280, 65535]], np.uint16)
"""16-bit grey values, and round(v / 257), what they show as on an 8-bit screen."""
GREYS_8 = np.array([[0, 0, 0, 1, 1, 128, 254, 255]], np.uint8)


def rgb(image: Image.Image) -> np.ndarray:
    converted = as_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    return np.asarray(converted, np.int16)


def grey_as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey.astype(np.int16)[..., None], 3, axis=2)


def decoded(data: bytes) -> Image.Image:
    return open_input(data, "image", LIMIT)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    ("image_format", "options", "tolerance"),
    [
        pytest.param("PNG", {}, 0, id="PNG"),
        pytest.param("WEBP", {"lossless": True}, 0, id="WebP"),
        pytest.param("JPEG", {"quality": 95}, 6, id="JPEG"),  # lossy: about as displayed
    ],
)
def test_each_exif_orientation_is_shown_upright(
    orientation: int, image_format: str, options: dict, tolerance: int
) -> None:
    displayed = quadrants(64, 32)
    stored = stored_as(displayed, orientation)
    data = encoded(stored, image_format, orientation=orientation, **options)
    header = Image.open(io.BytesIO(data))
    assert displayed_size(header) == (64, 32)  # before decoding: what size checks see
    image = decoded(data)
    assert image.size == (64, 32) and image.format == image_format
    difference = np.abs(rgb(image) - np.asarray(displayed, np.int16)).mean()
    assert difference <= tolerance


def test_the_pixel_limit_names_the_displayed_size() -> None:
    data = encoded(stored_as(quadrants(64, 32), 6), "JPEG", orientation=6)  # stored 32x64
    with pytest.raises(VLLMValidationError, match=r"mask is 64x32: at most 2047 pixels") as error:
        open_input(data, "mask", 2047)
    assert error.value.parameter == "mask"
    assert open_input(data, "mask", 2048).size == (64, 32)


def test_exif_that_does_not_parse_leaves_the_image_as_stored() -> None:
    data = encoded(quadrants(), "JPEG", exif=b"Exif\x00\x00MM\x00*not-a-tiff-directory")
    with pytest.warns(UserWarning):  # Pillow's "Corrupt EXIF data"
        image = decoded(data)
    assert image.size == (64, 32)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_wide_grey_is_scaled_to_8_bits_not_clipped(mode: str) -> None:
    if mode == "I":
        image = Image.fromarray(GREYS_16.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (8, 1), GREYS_16.astype(dtype).tobytes())
    assert image.mode == mode
    assert np.array_equal(rgb(image), grey_as_rgb(GREYS_8))


def test_a_16_bit_grey_png_is_scaled_and_its_transparent_value_is_white() -> None:
    data = encoded(Image.fromarray(GREYS_16), "PNG")
    image = decoded(data)
    assert image.mode == "I;16"  # as Pillow opens 16-bit grey
    assert np.array_equal(rgb(image), grey_as_rgb(GREYS_8))
    assert alpha_channel(image) is None
    transparent = decoded(encoded(Image.fromarray(GREYS_16), "PNG", transparency=32768))
    expected = GREYS_8.copy()
    expected[0, 5] = 255  # the pixel of value 32768, transparent, is shown on white
    assert np.array_equal(rgb(transparent), grey_as_rgb(expected))
    alpha = alpha_channel(transparent)
    assert alpha is not None
    assert np.asarray(alpha).tolist() == [[255, 255, 255, 255, 255, 0, 255, 255]]


def test_float_grey_is_read_from_0_to_1() -> None:
    image = Image.fromarray(np.array([[-1.0, 0.0, 0.5, 0.999, 1.0, 2.0]], np.float32))
    assert image.mode == "F"
    assert np.array_equal(rgb(image), grey_as_rgb(np.array([[0, 0, 128, 255, 255, 255]])))


def test_a_palette_is_read_through_its_palette_and_a_transparent_entry_is_white() -> None:
    palette = Image.new("P", (4, 1))
    palette.putpalette([250, 10, 10, 10, 250, 10, 10, 10, 250])
    palette.putdata([0, 1, 2, 1])
    image = decoded(encoded(palette, "PNG", transparency=1))
    assert image.mode == "P"
    expected = [[[250, 10, 10], [255, 255, 255], [10, 10, 250], [255, 255, 255]]]
    assert rgb(image).tolist() == expected
    alpha = alpha_channel(image)
    assert alpha is not None and np.asarray(alpha).tolist() == [[255, 0, 255, 0]]
    opaque = decoded(encoded(palette, "PNG"))
    assert rgb(opaque)[0, 1].tolist() == [10, 250, 10] and alpha_channel(opaque) is None


@pytest.mark.parametrize(
    ("mode", "pixel", "shown"),
    [
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # transparent: the white behind it
        ("RGBA", (0, 0, 200, 255), (0, 0, 200)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half over white
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (60, 255), (60, 60, 60)),
        ("L", 90, (90, 90, 90)),
        ("1", 1, (255, 255, 255)),
        ("1", 0, (0, 0, 0)),
    ],
)
def test_alpha_grey_and_bilevel_pngs_are_shown_on_white(
    mode: str, pixel: int | tuple[int, ...], shown: tuple[int, int, int]
) -> None:
    image = decoded(encoded(Image.new(mode, (4, 2), pixel), "PNG"))
    assert image.mode == mode
    assert np.abs(rgb(image) - np.array(shown)).max() <= 1


def test_cmyk_is_converted_by_pillow_or_by_an_icc_profile_lcms_can_use() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red ink
    plain = decoded(encoded(cmyk, "JPEG", quality=95))
    assert plain.mode == "CMYK"
    assert np.abs(rgb(plain) - np.array((255, 0, 0))).max() <= 3
    # An RGB profile on CMYK pixels: lcms cannot use it, so the image reads as without one.
    wrong = decoded(encoded(cmyk, "JPEG", quality=95, icc_profile=srgb_profile()))
    assert np.array_equal(rgb(wrong), rgb(plain))


def test_an_icc_profile_is_converted_to_srgb() -> None:
    colour = (200, 30, 10)
    image = decoded(encoded(Image.new("RGB", (4, 4), colour), "PNG", icc_profile=swapped()))
    assert np.abs(rgb(image) - np.array(colour[::-1])).max() <= 1  # its red is sRGB's blue
    untouched = decoded(encoded(Image.new("RGB", (4, 4), colour), "PNG", icc_profile=b"junk"))
    assert rgb(untouched)[0, 0].tolist() == list(colour)  # a broken profile is passed over


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not an image at all", "is not a PNG, JPEG or WebP image"),
        (encoded(quadrants(), "GIF"), "is not a PNG, JPEG or WebP image"),
        (encoded(quadrants(), "BMP"), "is not a PNG, JPEG or WebP image"),
        (encoded(quadrants(), "JPEG")[:400], "is not a readable PNG, JPEG or WebP image"),
    ],
)
def test_what_cannot_be_read_is_refused_by_name_without_internals(data: bytes, reason: str) -> None:
    with pytest.raises(VLLMValidationError) as error:
        open_input(data, "mask", LIMIT)
    assert error.value.parameter == "mask"
    message = str(error.value)
    assert message.startswith(f"mask {reason}")
    assert "object at 0x" not in message and "BytesIO" not in message


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def swapped() -> bytes:
    """lcms's sRGB profile with its red and blue primaries exchanged."""
    profile = bytearray(srgb_profile())
    (count,) = struct.unpack(">I", profile[128:132])
    tags = {}
    for index in range(count):
        signature, offset, size = struct.unpack(">4sII", profile[132 + 12 * index :][:12])
        tags[signature] = slice(offset, offset + size)
    red, blue = tags[b"rXYZ"], tags[b"bXYZ"]
    profile[red], profile[blue] = profile[blue], profile[red]
    return bytes(profile)
