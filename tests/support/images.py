"""Images and request fields the API tests share: one PNG maker, one set of fast defaults."""

from __future__ import annotations

import io

import numpy as np
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
