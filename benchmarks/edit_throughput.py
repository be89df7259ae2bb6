"""Edits (`POST /v1/images/edits`, image-to-image) at concurrency 1 and 8, batching on and off,
side by side in one run on the same model.

    .venv/bin/python -m benchmarks.edit_throughput      # writes docs/benchmarks/edit_throughput.md

Each request uploads its own 128x128 PNG (a different picture per request), so a batch carries
several input images; the naive baseline server has no edits and is not part of this one.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.load import sweep
from benchmarks.report import markdown_table, publish
from benchmarks.throughput import load_parser, measure_each, parsed_levels, servers


def input_png(index: int, size: int) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def measure(
    base_url: str, levels: list[int], per_worker: int, size: str, steps: int, label: str
) -> list[dict[str, Any]]:
    side = int(size.split("x")[0])

    def body(index: int) -> dict[str, Any]:
        return {"prompt": f"edit {index}", "num_inference_steps": steps, "seed": index}

    def files(index: int) -> dict[str, tuple[str, bytes, str]]:
        return {"image": ("in.png", input_png(index, side), "image/png")}

    # The warm-up also builds the model's img2img pipeline.
    return await sweep(base_url, levels, per_worker, body, label, files=files)


def main() -> None:
    parser = load_parser(__doc__, levels="1,8")
    args = parser.parse_args()
    levels = parsed_levels(parser, args)
    batching = servers(args.model, args.max_batch_size, naive=False)
    rows = measure_each(
        batching,
        lambda url, label: measure(url, levels, args.per_worker, args.size, args.steps, label),
    )
    by = {(row["server"], row["concurrency"]): row for row in rows}
    on_label, off_label = batching
    verdict = {
        "c8_vs_c1_batching_on": round(
            by[(on_label, 8)]["images_per_s"] / by[(on_label, 1)]["images_per_s"], 2
        ),
        "c8_on_vs_off": round(
            by[(on_label, 8)]["images_per_s"] / by[(off_label, 8)]["images_per_s"], 2
        ),
        "lost_or_failed": sum(row["lost_or_failed"] for row in rows),
        "duplicated_images": sum(row["duplicated_images"] for row in rows),
    }
    columns = ["server", "concurrency", "requests", "ok", "lost_or_failed", "duplicated_images",
               "images_per_s", "p50_ms", "p99_ms"]  # fmt: skip
    publish(
        "edit_throughput",
        title=f"Edit throughput and latency ({args.model}, {args.size}, {args.steps} steps)",
        intro="Closed loop of image-to-image edits, each with its own uploaded image: each of "
        f"`concurrency` clients sends its next request when the last is answered, "
        f"{args.per_worker} requests each (at least 16 in all).",
        body=markdown_table(rows, columns) + "\n" + markdown_table([verdict], list(verdict)),
        results={"rows": rows, "ratios": verdict},
    )


if __name__ == "__main__":
    main()
