"""Images and request fields the API tests share: one PNG maker, one set of fast defaults."""

from __future__ import annotations

import io

from PIL import Image

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
