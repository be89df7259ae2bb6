"""Turning generated images into the bytes an API response carries."""

from __future__ import annotations

import base64
import io

from PIL import Image

# zlib level 1 is several times faster than PIL's default (6) for a few percent more bytes on
# diffusion images; see docs/performance.md.
PNG_COMPRESS_LEVEL = 1
DEFAULT_LOSSY_QUALITY = 100

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(
    image: Image.Image, output_format: str = "png", quality: int | None = None
) -> bytes:
    """Encode one image as PNG, JPEG or WebP; `quality` (0-100) applies to the lossy formats."""
    buffer = io.BytesIO()
    pil_format = _PIL_FORMATS[output_format]
    if pil_format == "PNG":
        image.save(buffer, format=pil_format, compress_level=PNG_COMPRESS_LEVEL)
    else:
        lossy_quality = DEFAULT_LOSSY_QUALITY if quality is None else quality
        image.convert("RGB").save(buffer, format=pil_format, quality=lossy_quality)
    return buffer.getvalue()


def encode_image_base64(
    image: Image.Image, output_format: str = "png", quality: int | None = None
) -> str:
    return base64.b64encode(encode_image(image, output_format, quality)).decode("ascii")


def decode_image_base64(data: str) -> Image.Image:
    """The inverse of `encode_image_base64` (for clients, examples and tests)."""
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image
