"""Memory-aware admission on the CPU: the served tiny model's peak memory per megapixel (and per
step), then two concurrent 2048x2048 n=4 requests without and with the pixel budget
(`--image-max-pixels-in-flight`), and what the budget costs in throughput.

    .venv/bin/python -m benchmarks.memory_admission   # writes docs/benchmarks/memory_admission.md

Memory is the resident memory of the `vllm serve` process tree (the diffusers engine runs in
the server's process), sampled every 20 ms, from just before a request to its answer; the
kernel's own high-water mark of the server process (VmHWM, reset first through
/proc/<pid>/clear_refs) checks the sampling. The run stops (and kills its servers) if the
host's available memory falls under 4 GiB, and each case waits until the host has room for
it (the machine is shared).

1. Bytes per megapixel: one request at a time at sizes from 512x512 to 2048x2048 (one image),
   at 2 and 8 denoising steps, and one 2048x2048 n=4 request, on a server without a budget;
   the slope of peak memory over megapixels (least squares) is the model's figure.
2. Before (no budget, `--image-max-batch-size 8`, where two n=4 requests share one call): two
   concurrent 2048x2048 n=4 requests would make one call of 33.5 megapixels. They are not run
   here (the machine is shared): their peak is the server's idle memory plus twice what the
   single 2048x2048 n=4 request of step 1 added (a call's memory is linear in its pixels, as
   step 1 and step 3 show).
3. Side by side, scaled down to 1024x1024 (two concurrent n=4 requests, batch size 8), on two
   servers started together and used in alternation: without a budget (one call of 8 images)
   and with a budget of one request (`4x1024x1024`: two calls of 4). Peak memory of each, and
   the throughput ratio.
4. After, full size: two concurrent 2048x2048 n=4 requests on a server with the default budget
   (`auto`, batch size 8): its budget (from its log), its peak, its calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.report import benchmark_parser, markdown_table, median, publish
from benchmarks.soak import listener, metrics
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.tiny_model import TINY_MODEL_BYTES_PER_MEGAPIXEL

MiB = 2**20
GiB = 2**30
MEMORY_FLOOR = 4 * GiB
"""The host's available memory under which the run stops (the machine is shared)."""
STEPS = 2
LARGE = (2048, 2048, 4)
SMALL = (1024, 1024, 4)
SINGLES = [(512, 512, 1, STEPS), (1024, 1024, 1, STEPS), (1024, 1024, 1, 8)]
SINGLES += [(1440, 1440, 1, STEPS), (2048, 2048, 1, STEPS), (2048, 2048, 4, STEPS)]
"""Step 1's requests (width, height, n, steps), one at a time."""
BUDGET_LINE = re.compile(r"Pixel budget: (\d+) pixels")


class MemoryFloorError(RuntimeError):
    pass


def host_available() -> int:
    return int(psutil.virtual_memory().available)


class PeakSampler:
    """The peak resident memory of a process tree, sampled every 20 ms inside `with`; kills the
    tree's process group and fails the run if the host's available memory drops under the
    floor."""

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.peak = 0
        self.lowest_available = host_available()
        self.floor_hit = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu_s(self) -> float:
        """CPU seconds the tree has spent (user and system)."""
        total = 0.0
        for process in [self.root, *self.root.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())
            available = host_available()
            self.lowest_available = min(self.lowest_available, available)
            if available < MEMORY_FLOOR and not self.floor_hit:
                self.floor_hit = True
                os.killpg(os.getpgid(self.root.pid), signal.SIGKILL)

    def __enter__(self) -> PeakSampler:
        self.peak = self.rss()
        _write(self.root, "clear_refs", "5")  # VmHWM from now on
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.floor_hit:
            raise MemoryFloorError(
                f"the host's available memory fell under {MEMORY_FLOOR / GiB:g} GiB: stopped"
            )

    def high_water_mark(self) -> int:
        """The server process's VmHWM since `__enter__` (the kernel's own peak)."""
        status = Path(f"/proc/{self.root.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def _write(process: psutil.Process, name: str, text: str) -> None:
    Path(f"/proc/{process.pid}/{name}").write_text(text)


async def wait_for_room(megapixels: float, timeout_s: float = 1800) -> None:
    """Wait until the host's available memory holds a call of `megapixels` (at the tiny
    model's recorded figure, plus a quarter) above the floor: the machine is shared, and what
    others use comes and goes."""
    needed = MEMORY_FLOOR + 1.25 * megapixels * TINY_MODEL_BYTES_PER_MEGAPIXEL
    deadline = time.monotonic() + timeout_s
    while host_available() < needed:
        if time.monotonic() > deadline:
            raise MemoryFloorError(f"the host never had {needed / GiB:.1f} GiB available")
        print(f"waiting for {needed / GiB:.1f} GiB available", flush=True)
        await asyncio.sleep(10)


def batch_calls(base_url: str) -> tuple[float, float]:
    """The engine's calls so far and their images (`vllm:image_batch_size`'s count and sum)."""
    values = metrics(base_url)
    count = sum(v for k, v in values.items() if k.startswith("vllm:image_batch_size_count"))
    images = sum(v for k, v in values.items() if k.startswith("vllm:image_batch_size_sum"))
    return count, images


async def run_case(
    base_url: str,
    root: psutil.Process,
    size: tuple[int, int, int],
    steps: int = STEPS,
    concurrent: int = 1,
) -> dict[str, Any]:
    """`concurrent` requests of `size` (width, height, n) at once: peak memory, time, calls.
    Started once the host has room for one call of them (`wait_for_room`)."""
    width, height, n = size
    await asyncio.sleep(1.0)  # the previous answer's memory settles
    await wait_for_room(n * width * height / 1e6)
    calls_before = batch_calls(base_url)
    cpu_before = PeakSampler(root).cpu_s()
    sampler = PeakSampler(root)
    baseline = sampler.rss()
    async with httpx.AsyncClient(base_url=base_url, timeout=1800) as client:
        with sampler:
            start = time.monotonic()
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/images/generations",
                        json={
                            "prompt": "a lighthouse on a cliff at dusk",
                            "size": f"{width}x{height}",
                            "n": n,
                            "num_inference_steps": steps,
                            "seed": 100 * index,
                        },
                    )
                    for index in range(concurrent)
                )
            )
            wall = time.monotonic() - start
    for response in responses:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:500]}")
    calls_after = batch_calls(base_url)
    cpu_s = PeakSampler(root).cpu_s() - cpu_before
    images = concurrent * n
    megapixels = images * width * height / 1e6
    row = {
        "size": f"{width}x{height}",
        "n": n,
        "steps": steps,
        "requests": concurrent,
        "megapixels": round(megapixels, 2),
        "baseline_mib": round(baseline / MiB),
        "peak_mib": round(sampler.peak / MiB),
        "added_mib": round((sampler.peak - baseline) / MiB),
        "added_mib_per_mp": round((sampler.peak - baseline) / MiB / megapixels),
        "vmhwm_mib": round(sampler.high_water_mark() / MiB),
        "lowest_host_available_gib": round(sampler.lowest_available / GiB, 1),
        "wall_s": round(wall, 1),
        "images_per_s": round(images / wall, 4),
        "cpu_s_per_image": round(cpu_s / images, 2),
        "calls": int(calls_after[0] - calls_before[0]),
    }
    print(row, flush=True)  # progress, and what a run that stops early got
    return row


@contextmanager
def server(name: str, flags: list[str], logs: Path) -> Iterator[tuple[str, psutil.Process, Path]]:
    port = free_port()
    log = logs / f"{name}.log"
    # A batch delay lets two requests that arrive together at an idle engine share a call, as
    # they would at a busy one; no time limit (2048x2048 calls take minutes on 2 cores).
    fixed = ["--image-request-timeout", "0", "--image-batch-delay-ms", "500"]
    command = vllm_serve_command("tiny-qwen-image", port, *fixed, *flags)
    with running_server(command, port, log) as base_url:
        yield base_url, listener(port), log


async def warm_up(base_url: str, root: psutil.Process) -> int:
    """One small request (first-call costs), then the idle memory of the tree."""
    await run_case(base_url, root, (256, 256, 1))
    await asyncio.sleep(2.0)
    return PeakSampler(root).rss()


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of y over x."""
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


async def measure(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "host_total_gib": round(psutil.virtual_memory().total / GiB, 1),
        "host_available_at_start_gib": round(host_available() / GiB, 1),
    }
    off = ["--image-max-batch-size", "8", "--image-max-pixels-in-flight", "0"]
    # 1 and 3 (before) on one server without a budget; 3 (after) beside it.
    with ExitStack() as stack:
        off_url, off_root, _ = stack.enter_context(server("no_budget", off, logs))
        idle = await warm_up(off_url, off_root)
        results["idle_mib"] = round(idle / MiB)
        singles = [
            await run_case(off_url, off_root, (w, h, n), steps) for w, h, n, steps in SINGLES
        ]
        results["singles"] = singles
        points = [
            (row["megapixels"], row["peak_mib"] * MiB)
            for row in singles
            if row["steps"] == STEPS and row["megapixels"] >= 1
        ]
        per_mp = slope(points)
        results["bytes_per_megapixel"] = round(per_mp)
        large = singles[-1]
        results["before_computed"] = {
            "peak_mib": large["baseline_mib"] + 2 * large["added_mib"],
            "added_mib": 2 * large["added_mib"],
            "how": "the server's memory before the 2048x2048 n=4 request of step 1, plus "
            "twice what that request added",
        }
        budget_flags = [
            "--image-max-batch-size",
            "8",
            "--image-max-pixels-in-flight",
            "4x1024x1024",
        ]
        small_url, small_root, _ = stack.enter_context(server("budget_4x1024", budget_flags, logs))
        await warm_up(small_url, small_root)
        rounds = []
        for index in range(args.rounds):
            order = [("before", off_url, off_root), ("after", small_url, small_root)]
            for label, url, root in order if index % 2 == 0 else order[::-1]:
                row = await run_case(url, root, SMALL, concurrent=2)
                rounds.append({"round": index + 1, "case": label, **row})
        results["side_by_side"] = rounds
    auto_flags = ["--image-max-batch-size", "8"]
    # The budget `auto` finds depends on what the host has available as the server starts.
    await wait_for_room(LARGE[0] * LARGE[1] * LARGE[2] / 1e6)
    results["auto_available_gib"] = round(host_available() / GiB, 1)
    with server("auto_budget", auto_flags, logs) as (url, root, log):
        results["auto_idle_mib"] = round(await warm_up(url, root) / MiB)
        found = BUDGET_LINE.search(log.read_text())
        results["auto_budget_pixels"] = int(found.group(1)) if found else None
        if found is None or int(found.group(1)) < LARGE[0] * LARGE[1] * LARGE[2]:
            raise RuntimeError(
                f"the auto budget ({found and found.group(1)}) does not hold one 2048x2048 n=4 "
                "request on this machine now: free memory, or rerun"
            )
        results["after"] = await run_case(url, root, LARGE, concurrent=2)
    return results


def report(results: dict[str, Any]) -> tuple[str, str]:
    side = results["side_by_side"]
    before = [r for r in side if r["case"] == "before"]
    after = [r for r in side if r["case"] == "after"]
    ratio = median([r["images_per_s"] for r in after]) / median([r["images_per_s"] for r in before])
    results["throughput_ratio_after_over_before"] = round(ratio, 3)
    cpu_ratio = median([r["cpu_s_per_image"] for r in after]) / median(
        [r["cpu_s_per_image"] for r in before]
    )
    results["cpu_per_image_ratio_after_over_before"] = round(cpu_ratio, 3)
    large = results["singles"][-1]
    full = results["after"]
    per_mp = results["bytes_per_megapixel"] / MiB
    intro = (
        f"The tiny model's peak memory grows by {per_mp:.0f} MiB per megapixel of a call "
        f"(least squares over the one-request rows from 1 megapixel up), whatever the steps. "
        f"Two concurrent 2048x2048 n=4 requests without a budget (batch size 8) would peak at "
        f"{results['before_computed']['peak_mib'] / 1024:.1f} GiB (computed: the server's "
        f"{large['baseline_mib'] / 1024:.1f} GiB before one such request + 2 x the "
        f"{large['added_mib'] / 1024:.1f} GiB it added); with "
        f"the default budget ({results['auto_budget_pixels'] / 1e6:.1f} megapixels on this "
        f"machine) they peaked at {full['peak_mib'] / 1024:.1f} GiB, run as {full['calls']} "
        f"calls. Scaled down to 1024x1024 and measured side by side, the budget's throughput is "
        f"{ratio:.2f}x that of one shared call, for {cpu_ratio:.2f}x the CPU time per image "
        "(which the machine's other work does not skew)."
    )
    columns = ["size", "n", "steps", "megapixels", "baseline_mib", "peak_mib", "added_mib"]
    columns += ["added_mib_per_mp", "vmhwm_mib", "wall_s"]
    body = "## 1. Peak memory per megapixel (one request at a time, no budget)\n\n"
    body += markdown_table(results["singles"], columns)
    body += "\n## 3. Side by side at 1024x1024: two concurrent n=4 requests, batch size 8\n\n"
    body += (
        "`before`: no budget (one call of 8 images); `after`: `--image-max-pixels-in-flight "
        "4x1024x1024` (two calls of 4).\n\n"
    )
    columns = ["round", "case", "calls", "peak_mib", "added_mib", "vmhwm_mib", "wall_s"]
    columns += ["images_per_s", "cpu_s_per_image"]
    body += markdown_table(side, columns)
    body += (
        f"\nAfter / before (medians): throughput **{ratio:.3f}**, CPU time per image "
        f"**{cpu_ratio:.3f}**.\n"
    )
    body += "\n## 2 and 4. Two concurrent 2048x2048 n=4 requests, batch size 8\n\n"
    total = results["host_total_gib"]
    rows = [
        {
            "case": "before: no budget (computed, not run)",
            "calls": 1,
            "peak_mib": results["before_computed"]["peak_mib"],
            "added_mib": results["before_computed"]["added_mib"],
        },
        {
            "case": f"after: auto budget, {results['auto_budget_pixels']} pixels",
            **{k: full[k] for k in ("calls", "peak_mib", "added_mib", "vmhwm_mib", "wall_s")},
            "lowest_host_available_gib": full["lowest_host_available_gib"],
        },
    ]
    for row in rows:
        row["share_of_host_memory"] = f"{row['peak_mib'] / 1024 / total:.0%}"
    columns = ["case", "calls", "peak_mib", "added_mib", "share_of_host_memory", "vmhwm_mib"]
    body += markdown_table(rows, [*columns, "wall_s", "lowest_host_available_gib"])
    body += (
        f"\nThe host has {total} GiB; {results['host_available_at_start_gib']} GiB were "
        "available as the run started (the machine is shared), "
        f"{results['auto_available_gib']} GiB as the `auto` server started.\n"
    )
    return intro, body


def main() -> None:
    parser = benchmark_parser(__doc__, model=False)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memory-admission-") as folder:
        results = asyncio.run(measure(args, Path(folder)))
    intro, body = report(results)
    publish(
        "memory_admission",
        title="Memory-aware admission on the CPU (tiny-qwen-image, diffusers engine)",
        intro=intro,
        body=body,
        results=results,
    )


if __name__ == "__main__":
    main()
