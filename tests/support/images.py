"""Images and request fields the API tests share: one PNG maker, one set of fast defaults."""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image

FAST_STEPS = {"num_inference_steps": 2}
"""The fewest denoising steps the tiny model makes an image in (its scheduler needs two)."""

FAST = {"size": "64x64", **FAST_STEPS}
"""A generation the tiny model makes at once: its smallest size, its fewest steps. An edit
sends `FAST_STEPS` (its size is its input's)."""

PLAIN_COLOUR = (200, 40, 40, 255)


def png(
    image: Image.Image | None = None, *, width: int = 64, height: int = 64, mode: str = "RGB"
) -> bytes:
    """`image` as PNG bytes; without one, a plain `width`x`height` picture in `mode`."""
    if image is None:
        image = Image.new(mode, (width, height), PLAIN_COLOUR[: len(mode)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gradient_source(seed: int = 0, size: int = 64) -> Image.Image:
    """An edit's input with structure (a left-to-right gradient under noise), RGB."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    noise = rng.integers(0, 60, (size, size, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


def left_half_engine_mask(size: int = 64) -> Image.Image:
    """An engine's mask (`EngineRequest.mask`, `L`): white (change) on the left half, black
    (keep) on the right."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    return mask


def quadrants(width: int = 64, height: int = 32) -> Image.Image:
    """An RGB picture that shows which way up it is: red, green / blue, yellow quadrants."""
    array = np.zeros((height, width, 3), np.uint8)
    top, left = slice(0, height // 2), slice(0, width // 2)
    bottom, right = slice(height // 2, height), slice(width // 2, width)
    array[top, left], array[top, right] = (220, 30, 30), (30, 200, 40)
    array[bottom, left], array[bottom, right] = (30, 40, 210), (230, 220, 30)
    return Image.fromarray(array)


def stored_as(displayed: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores for `displayed` with EXIF `orientation` (1-8), from the
    EXIF specification's words ("the 0th row is the visual right-hand side, the 0th column
    the visual top": 6), not from Pillow's transposes."""
    d = np.asarray(displayed)
    stored = {
        1: d,  # 0th row top, 0th column left
        2: d[:, ::-1],  # top, right
        3: d[::-1, ::-1],  # bottom, right
        4: d[::-1, :],  # bottom, left
        5: d.swapaxes(0, 1),  # left, top
        6: d[:, ::-1].swapaxes(0, 1),  # right, top
        7: d[::-1, ::-1].swapaxes(0, 1),  # right, bottom
        8: d[::-1, :].swapaxes(0, 1),  # left, bottom
    }[orientation]
    return Image.fromarray(np.ascontiguousarray(stored), displayed.mode)


def encoded(
    image: Image.Image, image_format: str = "PNG", *, orientation: int | None = None, **options
) -> bytes:
    """`image` as `image_format` bytes, with an EXIF Orientation tag when `orientation` is set;
    `options` go to Pillow's writer (`transparency`, `icc_profile`, `lossless`, ...)."""
    if orientation is not None:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()
