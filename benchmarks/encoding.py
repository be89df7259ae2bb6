"""PNG encoding: time and size per zlib level at 256, 512 and 1024 px, on the tiny model's
images (noise-like, the hardest case) and on a smooth synthetic image (closer to a photo).

    .venv/bin/python -m benchmarks.encoding              # writes docs/benchmarks/encoding.md
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.report import benchmark_parser, markdown_table, median, publish
from vllm_omni_images.images.encoding import PNG_COMPRESS_LEVEL
from vllm_omni_images.tiny_model import ensure_tiny_model

SIZES = (256, 512, 1024)
LEVELS = (0, 1, 3, 6, 9)  # 6 is PIL's (and zlib's) default


def smooth_image(size: int) -> Image.Image:
    """Gradients and soft shapes: compresses like a photograph, unlike random weights' noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    red = 0.5 + 0.5 * np.sin(6 * x + 3 * y)
    green = np.exp(-((x - 0.4) ** 2 + (y - 0.6) ** 2) * 8)
    blue = 0.5 + 0.5 * np.cos(9 * x * y)
    pixels = np.stack([red, green, blue], axis=-1) * 255
    noise = np.random.default_rng(0).normal(0, 2, pixels.shape)  # sensor-like grain
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def tiny_model_image(size: int) -> Image.Image:
    from diffusers import DiffusionPipeline

    pipe: Any = DiffusionPipeline.from_pretrained(str(ensure_tiny_model()))
    pipe.set_progress_bar_config(disable=True)
    image: Image.Image = pipe(
        prompt="a lighthouse at dawn",
        width=size,
        height=size,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        true_cfg_scale=1.0,
    ).images[0]
    return image


def png_cost(image: Image.Image, level: int, repeats: int) -> tuple[float, int]:
    timings = []
    size = 0
    for _ in range(repeats):
        buffer = io.BytesIO()
        start = time.perf_counter()
        image.save(buffer, format="PNG", compress_level=level)
        timings.append(time.perf_counter() - start)
        size = buffer.tell()
    return median(timings), size


def main() -> None:
    parser = benchmark_parser(__doc__, model=False)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        for kind, image in (("tiny model", tiny_model_image(size)), ("smooth", smooth_image(size))):
            default_ms, default_bytes = png_cost(image, 6, args.repeats)
            for level in LEVELS:
                seconds, nbytes = png_cost(image, level, args.repeats)
                rows.append(
                    {
                        "image": kind,
                        "px": size,
                        "level": level,
                        "ms": round(seconds * 1e3, 2),
                        "KiB": round(nbytes / 1024, 1),
                        "time_vs_default": round(seconds / default_ms, 2),
                        "size_vs_default": round(nbytes / default_bytes, 3),
                    }
                )
                print(rows[-1], flush=True)
    columns = ["image", "px", "level", "ms", "KiB", "time_vs_default", "size_vs_default"]
    publish(
        "encoding",
        title="PNG encoding cost by zlib level",
        intro=f"Median of {args.repeats} encodes of one image; ratios against level 6 (PIL's "
        f"default). The server uses level {PNG_COMPRESS_LEVEL}.",
        body=markdown_table(rows, columns),
        results={"rows": rows},
    )


if __name__ == "__main__":
    main()
