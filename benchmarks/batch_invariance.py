"""Seed invariance under batching: each request generated alone, then batched beside others
(different prompts, lengths and `n`), through the diffusers engine; the largest pixel
difference per image.

    .venv/bin/python -m benchmarks.batch_invariance      # docs/benchmarks/batch_invariance.md
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.report import benchmark_parser, markdown_table, publish
from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.tiny_model import ensure_tiny_model

PROMPTS = (
    "a red fox",
    "a lighthouse at dusk in heavy rain, oil painting, wide angle",
    "",
    "三只猫 on a sofa",
    "a very long prompt " * 20,
    "x",
    "a bowl of fruit",
    "an astronaut riding a horse",
)


COLUMNS = [
    "size",
    "requests_per_batch",
    "images",
    "max_diff_of_255",
    "images_identical",
    "values_changed_pct",
]


def main() -> None:
    parser = benchmark_parser(__doc__, model=False, steps=4)
    parser.add_argument("--sizes", default="64x64,128x128,256x256")
    args = parser.parse_args()
    runner = DiffusersRunner(str(ensure_tiny_model()), device="cpu")
    rows: list[dict[str, Any]] = []
    worst = 0
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        requests = [
            EngineRequest(
                prompt=prompt,
                seeds=tuple(range(100 * i, 100 * i + 1 + i % 2)),  # n = 1 or 2
                width=width,
                height=height,
                num_inference_steps=args.steps,
            )
            for i, prompt in enumerate(PROMPTS)
        ]
        alone = [runner.run([request])[0] for request in requests]
        for batch_size in (2, 4, len(requests)):
            differences = []
            changed = 0
            pixels = 0
            for start in range(0, len(requests), batch_size):
                chunk = requests[start : start + batch_size]
                for index, images in zip(
                    range(start, start + len(chunk)), runner.run(chunk), strict=True
                ):
                    for batched, single in zip(images, alone[index], strict=True):
                        delta = np.abs(np.asarray(batched, np.int16) - np.asarray(single, np.int16))
                        differences.append(int(delta.max()))
                        changed += int((delta > 0).sum())
                        pixels += delta.size
            worst = max(worst, *differences)
            rows.append(
                {
                    "size": size,
                    "requests_per_batch": batch_size,
                    "images": len(differences),
                    "max_diff_of_255": max(differences),
                    "images_identical": sum(d == 0 for d in differences),
                    "values_changed_pct": round(100 * changed / pixels, 3),
                }
            )
            print(rows[-1], flush=True)
    publish(
        "batch_invariance",
        title="Seed invariance under batching",
        intro=f"float32; {len(PROMPTS)} requests of different prompts and `n` (1 or 2), each "
        "generated alone and then in batches; the largest difference of any pixel value (0-255) "
        "between the two.",
        body=markdown_table(rows, COLUMNS) + f"\nLargest difference anywhere: **{worst}/255**.\n",
        results={"rows": rows},
    )


if __name__ == "__main__":
    main()
