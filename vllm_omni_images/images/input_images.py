"""Input images of edits and variations, read as a photo viewer shows them
(docs/image_api.md, "How input images are read").

`open_input` decodes one input: `read_header` opens a PNG, JPEG or WebP whose displayed size
(its header's, turned by its EXIF orientation: `displayed_size`) is within the pixel limit,
before anything is decoded; `decode_upright` decodes it and turns it upright. `as_rgb` then
gives the image to edit as 8-bit RGB, and `alpha_channel` a mask's opacity:

- 16-bit and 32-bit grey (`I;16`, `I;16B`, `I;16L`, `I`) are scaled (x 1/257), never clipped;
  a float image (`F`) is read as 0.0 black to 1.0 white;
- a palette (`P`) through its palette, its transparent entries included; `1` and `L` as grey;
- an embedded ICC profile (CMYK, RGB or grey) converted to sRGB with Pillow's `ImageCms`; CMYK
  without one by Pillow's own conversion; a profile lcms cannot use is passed over;
- transparency (an alpha channel, or a PNG's transparent colour or palette entries) composited
  over white for the image to edit; for a mask it is the mask (`alpha_channel`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from functools import cache

from PIL import ExifTags, Image, ImageCms, ImageMath, ImageOps, UnidentifiedImageError
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.protocol import check_aspect_ratio
from vllm_omni_images.images.safe_text import printable

INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
"""The only formats Pillow is asked to parse (`Image.open(formats=...)`)."""
FORMAT_NAMES = "PNG, JPEG or WebP"
BACKGROUND = (255, 255, 255)
"""What transparent pixels of an image to edit become, as vLLM's own image inputs do."""

WIDE_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
"""Grey of more than 8 bits (PNG's 16-bit grey opens as `I;16`), read as 0-65535."""
SIXTEEN_TO_EIGHT_BITS = 1 / 257
"""65535 -> 255: the 16-bit scale onto the 8-bit one."""
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_OPAQUE_MODE = {"RGBA": "RGB", "RGBa": "RGB", "PA": "RGB", "P": "RGB", "LA": "L", "La": "L"}
"""The mode of an image's colour, its alpha (or palette) aside."""
_PROFILED_MODES = frozenset({"RGB", "L", "CMYK"})
"""Modes whose colour an embedded ICC profile describes (lcms converts them to sRGB)."""
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
"""EXIF orientations that swap width and height (a quarter turn, or a transposition)."""


def open_input(data: bytes, parameter: str, max_pixels: int) -> Image.Image:
    """`data` decoded and upright (`read_header`, then `decode_upright`); raises
    `VLLMValidationError` naming `parameter`."""
    return decode_upright(read_header(data, parameter, max_pixels), parameter)


def read_header(data: bytes, parameter: str, max_pixels: int) -> Image.Image:
    """`data` opened, not decoded: a PNG, JPEG or WebP whose `displayed_size` is at most
    `max_pixels` and within the aspect bound (`protocol.check_aspect_ratio`); raises
    `VLLMValidationError` naming `parameter`."""
    with _refusing_unreadable(parameter, max_pixels):
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)  # reads the header only
        width, height = displayed_size(image)
        if width * height > max_pixels:
            raise VLLMValidationError(
                f"{parameter} is {width}x{height}: at most {max_pixels} pixels "
                "(--image-max-input-pixels).",
                parameter=parameter,
            )
        check_aspect_ratio(width, height, parameter)
    return image


def decode_upright(image: Image.Image, parameter: str) -> Image.Image:
    """`image` (from `read_header`) decoded, then turned upright by its EXIF orientation, in
    place: its `format`, `mode` and `info` stay. A file that does not decode (a truncated one)
    is a `VLLMValidationError` naming `parameter`, here rather than in the engine."""
    with _refusing_unreadable(parameter):
        image.load()
    _turn_upright(image)
    return image


@contextlib.contextmanager
def _refusing_unreadable(parameter: str, max_pixels: int = 0) -> Iterator[None]:
    """Pillow's errors as `VLLMValidationError`s naming `parameter`, without their internals
    (`UnidentifiedImageError`'s message holds the buffer's repr, `<_io.BytesIO object at ...>`)."""
    try:
        yield
    except Image.DecompressionBombError:  # Pillow's own, even larger limit, checked at open
        raise VLLMValidationError(
            f"{parameter} has more pixels than Pillow opens; at most {max_pixels} "
            "(--image-max-input-pixels).",
            parameter=parameter,
        ) from None
    except UnidentifiedImageError:
        raise VLLMValidationError(
            f"{parameter} is not a {FORMAT_NAMES} image (its bytes are none of these formats).",
            parameter=parameter,
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, VLLMValidationError):
            raise
        raise VLLMValidationError(
            f"{parameter} is not a readable {FORMAT_NAMES} image ({printable(str(error), 200)}).",
            parameter=parameter,
        ) from None


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """The `(width, height)` a photo viewer shows of `image`, opened but not yet decoded (its
    EXIF orientation applied to its header's size; `open_input`'s images are upright, their
    `size` is this). A PNG whose EXIF follows its pixels is shown as stored until decoded."""
    width, height = image.size
    if _header_orientation(image) in _TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def _header_orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # `PngImageFile.getexif` would decode the image to look for a late eXIf chunk
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # EXIF that does not parse: shown as stored, as photo viewers do
        return 1
    return orientation if isinstance(orientation, int) else 1


def _turn_upright(image: Image.Image) -> None:
    """Pillow's `exif_transpose`, in place (so `format` stays); EXIF that does not parse
    leaves the image as stored, as photo viewers do."""
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)


def as_rgb(image: Image.Image) -> Image.Image:
    """The image to edit as 8-bit RGB, as a viewer shows it on white: 16-bit grey scaled,
    its ICC profile (if lcms can use it) converted to sRGB, transparency over white."""
    profile = image.info.get("icc_profile")
    image = _eight_bit(image)
    alpha = alpha_channel(image)
    colour = _in_srgb(_colour(image), profile)
    if alpha is None:
        return colour
    composed = Image.new("RGB", colour.size, BACKGROUND)
    composed.paste(colour, mask=alpha)
    return composed


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """`image`'s opacity as `L` (0: transparent, 255: opaque): its alpha channel, or its
    transparent colour or palette entries (a PNG's `tRNS`); `None` when it has neither."""
    image = _eight_bit(image)
    if image.mode in ALPHA_MODES:
        return image.getchannel("A")
    if "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def _eight_bit(image: Image.Image) -> Image.Image:
    """Wide grey as `L` (`LA` with its transparent value as alpha), float as `L`; other modes
    as they are."""
    if image.mode == "F":
        return image.point(lambda value: value * 255 + 0.5).convert("L")
    if image.mode not in WIDE_GREY_MODES:
        return image
    wide = image.convert("I")
    grey = wide.point(lambda value: value * SIXTEEN_TO_EIGHT_BITS + 0.5).convert("L")
    grey.info = {key: value for key, value in image.info.items() if key != "transparency"}
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return grey
    # Pillow's own transparent conversion compares 8-bit values; this compares the 16-bit ones.
    opaque = ImageMath.lambda_eval(lambda args: (args["wide"] != transparent) * 255, wide=wide)
    assert isinstance(opaque, Image.Image)
    return Image.merge("LA", (grey, opaque.convert("L")))


def _colour(image: Image.Image) -> Image.Image:
    """`image` without its alpha, in the mode its colour is described in (a palette's RGB)."""
    mode = _OPAQUE_MODE.get(image.mode)
    if mode is None:
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # through the palette, its transparent entries included
    return image.convert(mode)


def _in_srgb(image: Image.Image, profile: object) -> Image.Image:
    if isinstance(profile, bytes) and profile and image.mode in _PROFILED_MODES:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(image, source, _srgb(), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            converted = None  # a profile lcms cannot use: read as sRGB, as viewers do
        if converted is not None:
            return converted
    return image.convert("RGB")


@cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
