"""Throughput and latency at concurrency 1-16: batching on, batching off, and the naive
baseline server, measured side by side in one run on the same model.

    .venv/bin/python -m benchmarks.throughput            # writes docs/benchmarks/throughput.md
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from benchmarks.load import generation_body, sweep
from benchmarks.report import benchmark_parser, markdown_table, publish
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.tiny_model import ensure_tiny_model

Servers = dict[str, tuple[list[str], int]]
"""Label -> (command, port) of each server a load benchmark measures."""


def servers(model: str, max_batch_size: int, *, naive: bool = True) -> Servers:
    """`vllm serve` with batching on and off, and (with `naive`) the naive baseline server."""
    on, off = free_port(), free_port()
    batching: Servers = {
        f"batching on (max {max_batch_size})": (
            vllm_serve_command(model, on, "--image-max-batch-size", str(max_batch_size)),
            on,
        ),
        "batching off": (vllm_serve_command(model, off, "--image-max-batch-size", "1"), off),
    }
    if not naive:
        return batching
    port = free_port()
    return {
        **batching,
        "naive baseline": (
            [
                sys.executable,
                "-m",
                "benchmarks.naive_server",
                "--model",
                model,
                "--port",
                str(port),
            ],
            port,
        ),
    }


def load_parser(doc: str | None, levels: str) -> argparse.ArgumentParser:
    """The options every load benchmark takes."""
    parser = benchmark_parser(doc, size="128x128", steps=4)
    parser.add_argument("--levels", default=levels)
    parser.add_argument("--per-worker", type=int, default=4, help="requests per worker")
    parser.add_argument("--max-batch-size", type=int, default=8)
    return parser


def parsed_levels(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    levels = [int(level) for level in args.levels.split(",")]
    if not {1, 8} <= set(levels):
        parser.error("--levels must include 1 and 8: the ratios compare them")
    return levels


def measure_each(
    servers: Servers, measure: Callable[[str, str], Coroutine[Any, Any, list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    """Start each server in turn and `measure(base_url, label)` it; all rows, in order."""
    ensure_tiny_model()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as logs:
        for label, (command, port) in servers.items():
            with running_server(command, port, Path(logs) / f"{port}.log") as base_url:
                rows += asyncio.run(measure(base_url, label))
    return rows


async def measure(
    base_url: str, levels: list[int], per_worker: int, size: str, steps: int, label: str
) -> list[dict[str, Any]]:
    body = generation_body(size, steps)

    return await sweep(base_url, levels, per_worker, body, label)


def main() -> None:
    parser = load_parser(__doc__, levels="1,2,4,8,16")
    args = parser.parse_args()
    levels = parsed_levels(parser, args)
    rows = measure_each(
        servers(args.model, args.max_batch_size),
        lambda url, label: measure(url, levels, args.per_worker, args.size, args.steps, label),
    )
    by = {(row["server"], row["concurrency"]): row for row in rows}
    labels = list(dict.fromkeys(row["server"] for row in rows))
    on, off, naive = labels
    verdict = {
        "c8_vs_c1_batching_on": round(by[(on, 8)]["images_per_s"] / by[(on, 1)]["images_per_s"], 2),
        "c8_on_vs_naive": round(by[(on, 8)]["images_per_s"] / by[(naive, 8)]["images_per_s"], 2),
        "c8_on_vs_off": round(by[(on, 8)]["images_per_s"] / by[(off, 8)]["images_per_s"], 2),
        "lost_or_failed": sum(row["lost_or_failed"] for row in rows),
        "duplicated_images": sum(row["duplicated_images"] for row in rows),
    }
    columns = ["server", "concurrency", "requests", "ok", "lost_or_failed", "duplicated_images",
               "images_per_s", "p50_ms", "p99_ms"]  # fmt: skip
    publish(
        "throughput",
        title=f"Throughput and latency ({args.model}, {args.size}, {args.steps} steps)",
        intro="Closed loop: each of `concurrency` clients sends its next request when the last "
        f"one is answered, {args.per_worker} requests each (at least 16 in all).",
        body=markdown_table(rows, columns) + "\n" + markdown_table([verdict], list(verdict)),
        results={"rows": rows, "ratios": verdict},
    )


if __name__ == "__main__":
    main()
