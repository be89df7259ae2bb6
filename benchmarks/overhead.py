"""Serving overhead: one request through `vllm serve --task image` and the `openai` SDK,
against the same pipeline call made directly in this process, interleaved one for one.

    .venv/bin/python -m benchmarks.overhead              # writes docs/benchmarks/overhead.md
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import openai
import torch

from benchmarks.report import benchmark_parser, markdown_table, median, percentile, publish
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.tiny_model import ensure_tiny_model, resolve_model_path

TARGET_RATIO = 1.10


def main() -> None:
    parser = benchmark_parser(__doc__, size="128x128", steps=2)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--pause-s", type=float, default=0.2)
    args = parser.parse_args()
    ensure_tiny_model()
    width, height = (int(v) for v in args.size.split("x"))

    from diffusers import DiffusionPipeline

    pipe: Any = DiffusionPipeline.from_pretrained(resolve_model_path(args.model))
    pipe.set_progress_bar_config(disable=True)

    def direct(seed: int) -> None:
        # What the engine runs for this request: the same arguments, one CPU generator.
        pipe(
            prompt=["a lighthouse at dawn"],
            width=width,
            height=height,
            num_inference_steps=args.steps,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            true_cfg_scale=1.0,
        )

    port = free_port()
    served: list[float] = []
    called: list[float] = []
    with tempfile.TemporaryDirectory() as logs:
        command = vllm_serve_command(args.model, port)
        with running_server(command, port, Path(logs) / "serve.log") as base_url:
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0)

            def through_server(seed: int) -> None:
                client.images.generate(
                    prompt="a lighthouse at dawn",
                    size=args.size,
                    extra_body={"seed": seed, "num_inference_steps": args.steps},
                )

            for seed in range(5):  # warm-up of both paths
                through_server(seed)
                direct(seed)
            for seed in range(args.iterations):
                for run, samples in ((through_server, served), (direct, called)):
                    # Let the other process's idle compute threads stop spinning first, so
                    # neither path pays for the other.
                    time.sleep(args.pause_s)
                    start = time.perf_counter()
                    run(seed)
                    samples.append(time.perf_counter() - start)

    ratio = median(served) / median(called)
    rows = [
        {
            "path": name,
            "p50_ms": round(median(samples) * 1e3, 2),
            "p99_ms": round(percentile(samples, 0.99) * 1e3, 2),
        }
        for name, samples in (("openai SDK -> vllm serve", served), ("direct pipeline", called))
    ]
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    publish(
        "overhead",
        title=f"Serving overhead ({args.model}, {args.size}, {args.steps} steps)",
        intro=f"{args.iterations} requests each way, interleaved.",
        body=markdown_table(rows, ["path", "p50_ms", "p99_ms"])
        + f"\nRatio of medians, served / direct: **{ratio:.3f}** ({verdict} the target "
        f"{TARGET_RATIO}).\n",
        results={"rows": rows, "ratio": round(ratio, 4)},
    )


if __name__ == "__main__":
    main()
