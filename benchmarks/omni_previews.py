"""What previews (`partial_images`) cost on vllm-omni's engine on the CPU: plain requests on an
engine in request mode (the default) and on one with streaming output
(`--diffusion-streaming-output`, which runs vllm-omni in step mode), and streamed requests on
the latter; engine-level (admission and the engine, no HTTP, no PNG encoding).

    .venv/bin/python -m benchmarks.omni_previews           # docs/benchmarks/omni_previews.md
    .venv/bin/python -m benchmarks.omni_previews --shared  # the report says the machine was

Each round builds each engine in turn (in-process, vllm-omni's `uni` worker on this package's
CPU platform; one at a time, as its worker's process-wide state requires; the order alternates
between rounds), warms it up, then runs closed loops at each concurrency (`--levels`, with
`--image-max-batch-size` `--max-batch`): plain requests on both engines, and on the streaming
one requests with `partial_images` `--partial-images` too. Rounds are pooled: img/s and the
CPU seconds of this process per image (which other work on a shared machine does not skew)
are medians over rounds, latencies are percentiles over all requests; a streamed request also
has its time to its first preview.

Previews need an opt-in flag if plain requests on the streaming engine are worse than on the
default one by more than `SAME_WITHIN` (img/s, CPU s per image or p50) at some concurrency:
else every server would pay for them.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # as `vllm serve --task image` sets it here

import argparse
import asyncio
import time
from typing import Any

from benchmarks.report import (
    SHARED_NOTE,
    benchmark_parser,
    checkout,
    machine_load,
    markdown_table,
    median,
    percentile,
    publish,
)
from vllm_omni_images.engine.base import EngineRequest, FinalImages, PreviewImages
from vllm_omni_images.engine.client import AdmissionConfig, ImageEngineClient
from vllm_omni_images.engine.omni_engine import OmniEngine
from vllm_omni_images.engine.omni_requests import build_omni_config
from vllm_omni_images.tiny_model import ensure_tiny_model

ENGINES = {"request mode": {}, "streaming output": {"diffusion_streaming_output": True}}
SAME_WITHIN = 0.05
"""A ratio within this of 1 reads as a draw: the run-to-run noise of a shared machine."""


async def closed_loop(
    client: ImageEngineClient, concurrency: int, requests: int, request: EngineRequest
) -> dict[str, Any]:
    """`requests` copies of `request` (each its own seed) from `concurrency` submitters, each
    sending its next when the last is answered: img/s, latencies, and times to a first preview."""
    next_index = 0
    latencies: list[float] = []
    first_previews: list[float] = []

    async def submitter() -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            start = time.perf_counter()
            first: float | None = None
            async for output in client.generate(
                EngineRequest(**{**vars(request), "seeds": (index,), "request_id": str(index)})
            ):
                if isinstance(output, PreviewImages) and first is None:
                    first = time.perf_counter() - start
                if isinstance(output, FinalImages):
                    latencies.append(time.perf_counter() - start)
            if first is not None:
                first_previews.append(first)

    start, cpu_start = time.perf_counter(), time.process_time()
    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return {
        "images_per_s": requests / (time.perf_counter() - start),
        "cpu_s_per_image": (time.process_time() - cpu_start) / requests,
        "latencies": latencies,
        "first_previews": first_previews,
    }


async def measure(
    engine: OmniEngine, args: argparse.Namespace, workloads: dict[str, EngineRequest]
) -> dict[tuple[str, int], dict[str, Any]]:
    admission = AdmissionConfig(max_queue_images=4096, request_timeout_s=None)
    client = ImageEngineClient(engine, "benchmark", admission)
    levels = [int(level) for level in args.levels.split(",")]
    results = {}
    for name, request in workloads.items():
        await closed_loop(client, max(levels), max(levels), request)  # warm-up
        for concurrency in levels:
            results[(name, concurrency)] = await closed_loop(
                client, concurrency, max(args.requests, concurrency * 2), request
            )
            print(name, concurrency, round(results[(name, concurrency)]["images_per_s"], 3))
    await client.close()
    return results


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [value for run in runs for value in run["latencies"]]
    previews = [value for run in runs for value in run["first_previews"]]
    return {
        "images_per_s": round(median([run["images_per_s"] for run in runs]), 3),
        "cpu_s_per_image": round(median([run["cpu_s_per_image"] for run in runs]), 3),
        "p50_ms": round(percentile(latencies, 0.5) * 1e3, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 1),
        "first_preview_p50_ms": round(percentile(previews, 0.5) * 1e3, 1) if previews else "",
    }


def main() -> None:
    parser = benchmark_parser(__doc__, model=False, size="256x256", steps=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12, help="per level and round")
    parser.add_argument("--levels", default="1,4")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--partial-images", type=int, default=3)
    parser.add_argument("--shared", action="store_true", help="the machine was shared")
    args = parser.parse_args()
    width, height = (int(value) for value in args.size.split("x"))
    plain = EngineRequest(
        prompt="a red fox", seeds=(0,), width=width, height=height, num_inference_steps=args.steps
    )
    streamed = EngineRequest(**{**vars(plain), "partial_images": args.partial_images})
    model = str(ensure_tiny_model())
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for round_index in range(args.rounds):
        order = list(ENGINES) if round_index % 2 == 0 else list(reversed(ENGINES))
        for engine_name in order:
            options = ENGINES[engine_name]
            config = build_omni_config(model, options, max_batch_size=args.max_batch)
            engine = OmniEngine(config)
            workloads = {"plain": plain}
            if options:
                workloads[f"partial_images={args.partial_images}"] = streamed
            try:
                results = asyncio.run(measure(engine, args, workloads))
            finally:
                asyncio.run(engine.close())
            for (workload, concurrency), result in results.items():
                runs.setdefault((engine_name, workload, concurrency), []).append(result)
    rows = [
        {"engine": engine, "requests": workload, "concurrency": concurrency, **pooled(results)}
        for (engine, workload, concurrency), results in runs.items()
    ]
    rows.sort(key=lambda row: (row["concurrency"], row["engine"], row["requests"]))
    verdict_rows, opt_in = verdicts(rows)
    columns = ["engine", "requests", "concurrency", "images_per_s", "cpu_s_per_image"]
    columns += ["p50_ms", "p99_ms", "first_preview_p50_ms"]
    notes = [f"Commit {checkout()}; {machine_load(load_before)}."]
    if args.shared:
        notes.insert(0, SHARED_NOTE)
    publish(
        "omni_previews",
        title=f"Previews on vllm-omni's engine, CPU (tiny Qwen-Image, {args.size}, "
        f"{args.steps} steps, max batch {args.max_batch})",
        intro=f"{args.rounds} rounds, each engine once per round (order alternating). "
        + " ".join(notes),
        body=markdown_table(rows, columns)
        + "\nstreaming output / request mode, plain requests:\n\n"
        + markdown_table(verdict_rows, ["concurrency", "images_per_s", "cpu_s_per_image", "p50_ms"])
        + f"\n**Previews {'need an opt-in flag' if opt_in else 'can be always on'}** (plain "
        f"requests {'lose' if opt_in else 'lose nothing beyond noise'} on the streaming engine).\n",
        results={"rows": rows, "ratios": verdict_rows, "opt_in": opt_in},
    )


def verdicts(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """Streaming / request mode for plain requests at each concurrency, and whether the
    streaming engine is worse on any (by more than `SAME_WITHIN`)."""
    plain = {(row["engine"], row["concurrency"]): row for row in rows if row["requests"] == "plain"}
    ratios = []
    for concurrency in sorted({concurrency for _, concurrency in plain}):
        base, streaming = (
            plain[("request mode", concurrency)],
            plain[("streaming output", concurrency)],
        )
        ratios.append(
            {
                "concurrency": concurrency,
                "images_per_s": round(streaming["images_per_s"] / base["images_per_s"], 2),
                "cpu_s_per_image": round(streaming["cpu_s_per_image"] / base["cpu_s_per_image"], 2),
                "p50_ms": round(streaming["p50_ms"] / base["p50_ms"], 2),
            }
        )
    worse = any(
        ratio["images_per_s"] < 1 - SAME_WITHIN
        or ratio["cpu_s_per_image"] > 1 + SAME_WITHIN
        or ratio["p50_ms"] > 1 + SAME_WITHIN
        for ratio in ratios
    )
    return ratios, worse


if __name__ == "__main__":
    main()
