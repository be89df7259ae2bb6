"""Engine-level throughput, batching on and off: admission and the diffusers engine alone,
without vLLM or HTTP, so it runs on a GPU machine that has only torch, transformers and
diffusers. Concurrent submitters in a closed loop, as in `benchmarks.throughput`.

    .venv/bin/python -m benchmarks.engine_throughput                       # tiny model, CPU
    python3 -m benchmarks.engine_throughput --shape wide --layers 4 \\
        --device cuda --size 1024x1024 --steps 20                          # on a GPU

`--shape wide` builds a random-weight Qwen-Image with the real model's widths and fewer
layers (`tiny_model.wide_shape`), directly on the device.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.report import benchmark_parser, markdown_table, percentile, publish
from testing.shared_runner import SharedRunner
from vllm_omni_images.engine.base import EngineRequest, FinalImages
from vllm_omni_images.engine.batching import (
    BatchingConfig,
    BatchingEngine,
)
from vllm_omni_images.engine.client import AdmissionConfig, ImageEngineClient
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.tiny_model import (
    build_qwen_image_pipeline,
    ensure_tiny_model,
    wide_shape,
)


def load_engine(shape: str, layers: int, device: str) -> DiffusersRunner:
    if shape == "tiny":
        return DiffusersRunner(str(ensure_tiny_model()), device=device)
    pipeline = build_qwen_image_pipeline(wide_shape(layers=layers), device=device)
    return DiffusersRunner(f"wide-qwen-image-{layers}-layers", device=device, pipeline=pipeline)


async def drive(
    client: ImageEngineClient,
    make_request: Callable[[int], EngineRequest],
    concurrency: int,
    requests: int,
) -> tuple[int, float, list[float]]:
    """Images, wall seconds and latencies of `requests` requests (request `i` is
    `make_request(i)`) from `concurrency` submitters, each sending its next when the last is
    answered: the engine-level closed loop (`benchmarks.load.closed_loop` is the HTTP one)."""
    next_index = 0
    latencies: list[float] = []
    images = 0

    async def worker() -> None:
        nonlocal next_index, images
        while next_index < requests:
            index = next_index
            next_index += 1
            start = time.perf_counter()
            async for output in client.generate(make_request(index)):
                if isinstance(output, FinalImages):
                    images += len(output.images)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return images, time.perf_counter() - start, latencies


async def closed_loop(
    client: ImageEngineClient, concurrency: int, requests: int, width: int, height: int, steps: int
) -> dict[str, Any]:
    def make_request(index: int) -> EngineRequest:
        return EngineRequest(
            prompt=f"benchmark request {index}",
            seeds=(index,),
            width=width,
            height=height,
            num_inference_steps=steps,
        )

    images, wall_s, latencies = await drive(client, make_request, concurrency, requests)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "images_per_s": round(images / wall_s, 3),
        "p50_ms": round(percentile(latencies, 0.5) * 1e3, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 1),
    }


async def run(engine: DiffusersRunner, args: argparse.Namespace) -> list[dict[str, Any]]:
    width, height = (int(v) for v in args.size.split("x"))
    levels = [int(v) for v in args.levels.split(",")]
    rows = []
    for max_batch in (int(v) for v in args.max_batch_sizes.split(",")):
        batching = BatchingEngine(
            SharedRunner(engine),
            BatchingConfig(max_batch_size=max_batch, batch_delay_ms=0, hang_grace_s=60.0),
        )
        admission = AdmissionConfig(max_queue_images=4096, request_timeout_s=None)
        client = ImageEngineClient(batching, "benchmark", admission)
        try:
            # Warm-up at every batch size this run will see (kernels, allocator, autotuning).
            await closed_loop(client, max(levels), max(levels), width, height, args.steps)
            for concurrency in levels:
                requests = max(args.min_requests, concurrency * args.per_worker)
                row = await closed_loop(client, concurrency, requests, width, height, args.steps)
                rows.append({"max_batch_size": max_batch, **row})
                print(rows[-1], flush=True)
        finally:
            await client.close()
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__, model=False, size="128x128", steps=4)
    parser.add_argument("--shape", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (wide)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--max-batch-sizes", default="1,8", help="1 = batching off")
    parser.add_argument("--per-worker", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16)
    args = parser.parse_args()

    started = time.perf_counter()
    engine = load_engine(args.shape, args.layers, args.device)
    load_s = time.perf_counter() - started
    rows = asyncio.run(run(engine, args))
    peak_gib = None
    if args.device.startswith("cuda"):
        peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    by = {(row["max_batch_size"], row["concurrency"]): row for row in rows}
    batch_sizes = sorted({row["max_batch_size"] for row in rows})
    top = max(row["concurrency"] for row in rows)
    ratio = None
    if len(batch_sizes) > 1:
        on, off = by[(batch_sizes[-1], top)], by[(batch_sizes[0], top)]
        ratio = round(on["images_per_s"] / off["images_per_s"], 2)
    columns = ["max_batch_size", "concurrency", "requests", "images_per_s", "p50_ms", "p99_ms"]
    publish(
        f"engine_throughput_{args.shape}_{args.device.split(':')[0]}",
        module="benchmarks.engine_throughput",
        title=f"Engine throughput, batching on and off ({engine.model_path}, {args.size}, "
        f"{args.steps} steps, {args.device}, {engine.dtype})",
        intro=f"Model built/loaded in {load_s:.1f} s; peak GPU memory {peak_gib} GiB.",
        body=markdown_table(rows, columns)
        + f"\nThroughput at concurrency {top}, largest batch / batch 1: **{ratio}**.\n",
        results={"rows": rows, "ratio": ratio, "peak_gib": peak_gib},
    )


if __name__ == "__main__":
    main()
