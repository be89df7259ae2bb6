"""Step-level batching (`--step-execution`) against request-level batching in vllm-omni's engine
on the CPU: the same Poisson arrivals at two offered loads, p50/p99 latency and throughput.

    .venv/bin/python -m benchmarks.step_batching        # writes docs/benchmarks/step_batching.md
    .venv/bin/python -m benchmarks.step_batching --shared   # the report says the machine was

Request-level batching runs a batch to its end: a request that arrives while one denoises
waits for it, then runs in the next. Step-level batching admits it at the next denoising step.
Both modes serve with `--image-engine omni --image-max-batch-size 4`, both servers up at once
(an idle one takes no CPU), measured alternately:

1. A warm-up of each, then each one's capacity: a short closed loop with twice the batch size
   of clients (so a full batch always waits), in img/s. The request-level capacity sets the
   offered loads (default 50 % and 90 % of it).
2. For each load, `--rounds` rounds, each mode once per round (request-level first in odd
   rounds, step-level first in even ones, so drift hits both alike): `--requests` requests,
   one image each, sent at Poisson arrival times whatever the answers. The arrivals come from
   a generator seeded with `--seed` plus the round, scaled so their mean rate is exactly the
   load: both modes see the same arrivals. Latency counts from the planned arrival; img/s is
   the images over the time from the first arrival to the last answer. Rounds are pooled.

Step-level batching should be the default if it is better (by more than 5 %) on some figure,
p50 or p99 latency or img/s at a load, or the capacity, and worse on none.

The embedded model denoises too fast for arrivals to land mid-run (its VAE and text encoder
take most of a request), so by default the model is the tiny Qwen-Image with a 512-wide
transformer (8 heads of 64, `--layers` layers; text encoder and VAE stay tiny), built into a
temporary folder and served at 128x128 and 20 steps: ~0.8 s a request alone, mostly
denoising.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import closed_loop, generation_body
from benchmarks.report import (
    SHARED_NOTE,
    benchmark_parser,
    checkout,
    machine_load,
    markdown_table,
    percentile,
    publish,
)
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.engine.base import DEFAULTS_FILE
from vllm_omni_images.tiny_model import TINY_SHAPE, QwenImageShape, build_qwen_image_pipeline

MODES = {"request-level": [], "step-level": ["--step-execution"]}
SAME_WITHIN = 0.05
"""A ratio within this of 1 reads as a draw: the run-to-run noise of a shared machine."""

Body = Callable[[int], dict[str, Any]]


def wider_shape(layers: int) -> QwenImageShape:
    """The tiny model with a 512-wide transformer: a denoising step costs ~20x the tiny one's,
    the text encoder and VAE stay tiny."""
    return dataclasses.replace(
        TINY_SHAPE,
        layers=layers,
        heads=8,
        head_dim=64,
        axes_dims_rope=(16, 24, 24),
        text_hidden=64,
        text_layers=1,
        text_heads=2,
        text_kv_heads=1,
        text_intermediate=128,
        mrope_section=(4, 6, 6),
        weight_gain=1.0,
    )


def build_model(path: Path, layers: int, size: str, steps: int) -> Path:
    pipeline = build_qwen_image_pipeline(wider_shape(layers))
    pipeline.save_pretrained(path, safe_serialization=True)
    width, height = (int(v) for v in size.split("x"))
    defaults = {"width": width, "height": height, "num_inference_steps": steps}
    (path / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
    return path


def poisson_arrivals(requests: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s) of `requests` Poisson arrivals, the first at 0, scaled so that their
    mean rate is exactly `rate` (`requests - 1` gaps of mean 1 / `rate`)."""
    rng = random.Random(seed)
    times = [0.0]
    for _ in range(requests - 1):
        times.append(times[-1] + rng.expovariate(1.0))
    scale = (requests - 1) / times[-1] / rate if requests > 1 else 0.0
    return [t * scale for t in times]


@dataclass
class OpenLoopResult:
    requests: int = 0
    images: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list, repr=False)
    failures: dict[str, int] = field(default_factory=dict)

    def add(self, other: OpenLoopResult) -> None:
        self.requests += other.requests
        self.images += other.images
        self.wall_s += other.wall_s
        self.latencies_s += other.latencies_s
        for key, count in other.failures.items():
            self.failures[key] = self.failures.get(key, 0) + count

    def summary(self) -> dict[str, Any]:
        latencies = self.latencies_s or [float("nan")]
        return {
            "requests": self.requests,
            "ok": self.images,
            "lost_or_failed": self.requests - self.images,
            "failures": self.failures,
            "images_per_s": round(self.images / self.wall_s, 3),
            "p50_ms": round(percentile(latencies, 0.5) * 1e3, 1),
            "p99_ms": round(percentile(latencies, 0.99) * 1e3, 1),
        }


async def open_loop(base_url: str, arrivals_s: list[float], body: Body) -> OpenLoopResult:
    """Send request `i` at `arrivals_s[i]` whatever the answers so far; check each answer
    (200, one image). Latency counts from the planned arrival."""
    import httpx

    result = OpenLoopResult(requests=len(arrivals_s))

    def failed(key: str) -> None:
        result.failures[key] = result.failures.get(key, 0) + 1

    async def send(client: httpx.AsyncClient, index: int, planned: float) -> None:
        await asyncio.sleep(max(0.0, planned - time.perf_counter()))
        try:
            response = await client.post("/v1/images/generations", json=body(index))
        except httpx.HTTPError as error:
            failed(type(error).__name__)
            return
        if response.status_code != 200:
            failed(str(response.status_code))
        elif len(response.json()["data"]) != 1:
            failed("wrong_count")
        else:
            result.latencies_s.append(time.perf_counter() - planned)
            result.images += 1

    limits = httpx.Limits(max_connections=len(arrivals_s) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(
            *(send(client, index, start + at) for index, at in enumerate(arrivals_s))
        )
        result.wall_s = time.perf_counter() - start
    return result


async def measure(
    urls: dict[str, str], args: argparse.Namespace, body: Body
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each mode's capacity (img/s), then the open loops, alternating; the capacities and a
    row per mode and load (rounds pooled)."""
    clients = 2 * args.max_batch_size
    capacities = {}
    for mode, url in urls.items():
        await closed_loop(url, args.max_batch_size, clients, body)  # warm-up, every batch size
        capacity = await closed_loop(url, clients, args.capacity_requests, body)
        print(f"{mode} capacity: {capacity.summary()}", flush=True)
        capacities[mode] = round(capacity.throughput_images_per_s, 3)
    rows = []
    for fraction in (float(v) for v in args.loads.split(",")):
        rate = fraction * capacities["request-level"]
        pooled = {mode: OpenLoopResult() for mode in urls}
        for run in range(args.rounds):
            arrivals = poisson_arrivals(args.requests, rate, args.seed + run)
            order = list(urls) if run % 2 == 0 else list(urls)[::-1]
            for mode in order:
                result = await open_loop(urls[mode], arrivals, body)
                print(f"{mode} {fraction:.0%} round {run + 1}: {result.summary()}", flush=True)
                pooled[mode].add(result)
        load = {"load": f"{fraction:.0%}", "offered_images_per_s": round(rate, 3)}
        rows += [{"mode": mode, **load, **result.summary()} for mode, result in pooled.items()]
    return capacities, rows


def reading(ratio: float, higher_is_better: bool) -> str:
    """A step-level / request-level ratio as better, worse or a draw, with the ratio."""
    gain = ratio - 1 if higher_is_better else 1 - ratio
    verdict = "draw" if abs(gain) <= SAME_WITHIN else "better" if gain > 0 else "worse"
    return f"{ratio:.2f} ({verdict})"


def compare(
    rows: list[dict[str, Any]], capacities: dict[str, float], result: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """step-level / request-level per load and figure, and for the capacity (img/s at
    saturation); and the figures read as `result` (better, worse)."""
    by = {(row["mode"], row["load"]): row for row in rows}
    table = []
    for load in dict.fromkeys(row["load"] for row in rows):
        step, request = by[("step-level", load)], by[("request-level", load)]
        entry: dict[str, Any] = {"load": load}
        for key, higher_is_better in (("p50_ms", False), ("p99_ms", False), ("images_per_s", True)):
            entry[key] = reading(step[key] / request[key], higher_is_better)
        table.append(entry)
    capacity = capacities["step-level"] / capacities["request-level"]
    table.append({"load": "saturated", "images_per_s": reading(capacity, True)})
    return table, [
        f"{key} ({entry['load']})"
        for entry in table
        for key, value in entry.items()
        if str(value).endswith(f"({result})")
    ]


def main() -> None:
    parser = benchmark_parser(__doc__, model=False, size="128x128", steps=20)
    parser.add_argument("--model", default=None, help="default: the wider model, built")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (built model)")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--loads", default="0.5,0.9", help="fractions of request-level capacity")
    parser.add_argument("--requests", type=int, default=40, help="per load, mode and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--capacity-requests", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="of the Poisson arrivals")
    parser.add_argument("--logs", type=Path, default=None, help="keep the servers' logs here")
    parser.add_argument("--shared", action="store_true", help="say so: other work ran too")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    body = generation_body(args.size, args.steps)

    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as servers:
        logs = args.logs or Path(scratch)
        logs.mkdir(parents=True, exist_ok=True)
        model = args.model
        if model is None:
            model = str(build_model(Path(scratch) / "model", args.layers, args.size, args.steps))
        urls = {}
        for mode, flags in MODES.items():
            port = free_port()
            command = vllm_serve_command(model, port, "--image-engine", "omni",
                                         "--image-max-batch-size", str(args.max_batch_size),
                                         *flags)  # fmt: skip
            urls[mode] = servers.enter_context(running_server(command, port, logs / f"{mode}.log"))
        capacities, rows = asyncio.run(measure(urls, args, body))
    comparison, better = compare(rows, capacities, "better")
    worse = compare(rows, capacities, "worse")[1]
    step_default = bool(better) and not worse
    model_name = args.model or f"Qwen-Image, 512-wide transformer, {args.layers} layers"
    verdict = (
        f"**step-level batching should be the default**: better on {', '.join(better)}; "
        "worse on nothing"
        if step_default
        else "**step-level batching should not be the default** (the bar: better on some "
        f"figure, worse on none): better on {', '.join(better) or 'nothing'}; worse on "
        f"{', '.join(worse) or 'nothing'}"
    )
    columns = ["mode", "load", "offered_images_per_s", "requests", "ok", "lost_or_failed",
               "images_per_s", "p50_ms", "p99_ms"]  # fmt: skip
    body_md = (
        f"Commit {checkout()}; {machine_load(load_before)}. Capacity (closed loop, "
        f"{2 * args.max_batch_size} clients, {args.capacity_requests} requests), img/s: "
        + ", ".join(f"{mode} **{value}**" for mode, value in capacities.items())
        + ".\n\n"
        + markdown_table(rows, columns)
        + f"\nstep-level / request-level (a ratio within {SAME_WITHIN:.0%} of 1 is a draw; "
        "saturated: the capacities):\n\n"
        + markdown_table(comparison, ["load", "p50_ms", "p99_ms", "images_per_s"])
        + f"\n{verdict}.\n"
    )
    publish(
        "step_batching",
        title=f"Step-level against request-level batching, vllm-omni on the CPU ({model_name}, "
        f"{args.size}, {args.steps} steps, max batch {args.max_batch_size})",
        intro=f"Per load and mode, {args.rounds} rounds of {args.requests} requests at Poisson "
        f"arrival times (seed {args.seed} + round), the same in both modes, pooled; the loads "
        f"are fractions of the request-level capacity."
        + (f" {SHARED_NOTE}" if args.shared else ""),
        body=body_md,
        results={
            "checkout": checkout(),
            "shared_machine": args.shared,
            "capacity_images_per_s": capacities,
            "rows": rows,
            "step_over_request": comparison,
            "step_level_should_be_default": step_default,
        },
    )


if __name__ == "__main__":
    main()
