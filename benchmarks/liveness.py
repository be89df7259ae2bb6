"""Liveness: `/health` latency while the server is saturated with image requests, against
the same server idle. Generation must never run on the event loop.

    .venv/bin/python -m benchmarks.liveness              # writes docs/benchmarks/liveness.md

The load runs in a separate process, so the prober's timings measure the server alone.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.report import benchmark_parser, markdown_table, percentile, publish
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.tiny_model import ensure_tiny_model

P99_RATIO_TARGET = 3.0
P99_MS_TARGET = 20.0


def generate_load(base_url: str, concurrency: int, size: str, steps: int, stop_at: float) -> None:
    """Keep `concurrency` image requests in flight until `stop_at` (time.time())."""

    async def worker(client: httpx.AsyncClient, worker_id: int) -> None:
        index = 0
        while time.time() < stop_at:
            body = {"prompt": f"load {worker_id}-{index}", "size": size,
                    "num_inference_steps": steps, "seed": index}  # fmt: skip
            await client.post("/v1/images/generations", json=body)
            index += 1

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
            await asyncio.gather(*(worker(client, w) for w in range(concurrency)))

    asyncio.run(run())


def probe(base_url: str, samples: int, interval_s: float) -> list[float]:
    latencies = []
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for _ in range(samples):
            start = time.perf_counter()
            response = client.get("/health")
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
            time.sleep(interval_s)
    return latencies


def queue_images(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("vllm:image_queue_images{", "vllm:image_running_images{"))
    )


def main() -> None:
    parser = benchmark_parser(__doc__, size="256x256", steps=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    ensure_tiny_model()
    interval_s = args.interval_ms / 1000
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        command = vllm_serve_command(args.model, port)
        with running_server(command, port, Path(logs) / "serve.log") as base_url:
            probe(base_url, 20, interval_s)  # warm-up
            idle = probe(base_url, args.samples, interval_s)
            window_s = args.samples * (interval_s + 0.01) + 30
            load = multiprocessing.get_context("spawn").Process(
                target=generate_load,
                args=(base_url, args.concurrency, args.size, args.steps, time.time() + window_s),
            )
            load.start()
            deadline = time.monotonic() + 60
            while queue_images(base_url) < args.concurrency - 1:  # saturated: all in flight
                assert time.monotonic() < deadline, "the load never saturated the server"
                time.sleep(0.1)
            busy_before = queue_images(base_url)
            saturated = probe(base_url, args.samples, interval_s)
            busy_after = queue_images(base_url)
            load.kill()
            load.join()

    def stats(name: str, samples: list[float]) -> dict[str, Any]:
        return {
            "server": name,
            "p50_ms": round(percentile(samples, 0.5) * 1e3, 2),
            "p99_ms": round(percentile(samples, 0.99) * 1e3, 2),
            "max_ms": round(max(samples) * 1e3, 2),
        }

    rows = [stats("idle", idle), stats(f"saturated ({args.concurrency} in flight)", saturated)]
    ratio = rows[1]["p99_ms"] / rows[0]["p99_ms"]
    meets = ratio <= P99_RATIO_TARGET and rows[1]["p99_ms"] <= P99_MS_TARGET
    publish(
        "liveness",
        title=f"`/health` latency, idle and saturated ({args.model}, {args.size}, "
        f"{args.steps} steps)",
        intro=f"{args.samples} sequential probes {args.interval_ms:g} ms apart; the load process "
        f"keeps {args.concurrency} requests in flight (images queued or running when probing "
        f"began/ended: {busy_before:g}/{busy_after:g}).",
        body=markdown_table(rows, ["server", "p50_ms", "p99_ms", "max_ms"])
        + f"\np99 saturated / idle: **{ratio:.2f}** ({'meets' if meets else 'misses'} the "
        f"targets: at most {P99_RATIO_TARGET:g}x idle and under {P99_MS_TARGET:g} ms).\n",
        results={"rows": rows, "p99_ratio": round(ratio, 3)},
    )


if __name__ == "__main__":
    main()
