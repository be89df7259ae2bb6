"""The two engines on the CPU side by side: vllm-omni's (`--image-engine omni`, through this
package's CPU platform) and this package's diffusers engine, started alternately in one run on
the same model: start-up, throughput and latency at concurrency 1 and 8, edits with and without
a mask, and memory.

    .venv/bin/python -m benchmarks.engines_cpu          # writes docs/benchmarks/engines_cpu.md
    .venv/bin/python -m benchmarks.engines_cpu --shared  # the report says the machine was

Each round starts both engines, one after the other, with the server's defaults otherwise (the
order alternates between rounds, so drift on a shared machine hits both alike). For each start:
seconds from the process start to a 200 from `/health` (as in `benchmarks.startup`), then, as
in `benchmarks.load.sweep`, a warm-up and a closed loop at concurrency 1 and 8, while the
resident memory of the server's process tree (the `vllm serve` process and all its children,
summed) is sampled every 0.5 s. Each level also gives the CPU seconds the tree spent per image,
and each start the niceness of the thread that worked most (the engine's compute priority).

The table gives each figure's median over the rounds and omni / diffusers, and applies the rule
for what `--image-engine auto` picks on the CPU: omni when its throughput is within 10 % of
diffusers' (at both concurrencies, and for edits) and its start-up under 1.5x diffusers'. It
applies it twice: to img/s, as the rule is worded, and to CPU time per image (generations),
which other work on the machine does not skew (img/s does, the more so when the engines
compute at different priorities).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

from benchmarks.edit_throughput import input_png
from benchmarks.load import closed_loop, generation_body
from benchmarks.report import (
    SHARED_NOTE,
    benchmark_parser,
    checkout,
    machine_load,
    markdown_table,
    median,
    publish,
)
from benchmarks.soak import Sampler, listener
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.tiny_model import ensure_tiny_model

ENGINES = ("diffusers", "omni")
LEVELS = [1, 8]
# The issue's rule: omni is the CPU's default if its img/s is within 10 % of diffusers' and its
# start-up stays under 1.5x diffusers'.
THROUGHPUT_WITHIN = 0.10
STARTUP_UNDER = 1.5
FIGURES = {
    "startup_s": "start-up to a healthy `/health` (s)",
    "c1_images_per_s": "img/s, concurrency 1",
    "c1_p50_ms": "p50 latency, concurrency 1 (ms)",
    "c1_cpu_s_per_image": "CPU s per image, concurrency 1",
    "c8_images_per_s": "img/s, concurrency 8",
    "c8_p50_ms": "p50 latency, concurrency 8 (ms)",
    "c8_cpu_s_per_image": "CPU s per image, concurrency 8",
    "edit_c1_images_per_s": "edits (image-to-image): img/s, concurrency 1",
    "edit_c8_images_per_s": "edits (image-to-image): img/s, concurrency 8",
    "inpaint_c8_images_per_s": "edits with a mask (inpainting): img/s, concurrency 8",
    "peak_rss_mib": "peak RSS of the server's processes (MiB)",
}
EDIT_LEVELS = {"edit_c1": (1, False), "edit_c8": (8, False), "inpaint_c8": (8, True)}
"""Edit loads: concurrency, and whether each request sends a mask."""


def server_tree(port: int) -> psutil.Process:
    """The `vllm serve` process listening on `port`: the leader of its session (the benchmark
    starts each server in a session of its own), whose children are the rest of the server."""
    return psutil.Process(os.getsid(listener(port).pid))


def tree_processes(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def thread_cpu_s(root: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) of every thread in `root`'s tree, by thread id."""
    times: dict[int, float] = {}
    for process in tree_processes(root):
        with contextlib.suppress(psutil.NoSuchProcess):
            times.update({t.id: t.user_time + t.system_time for t in process.threads()})
    return times


async def load(
    base_url: str, root: psutil.Process, args: argparse.Namespace
) -> dict[int, dict[str, Any]]:
    """As `benchmarks.load.sweep`: a warm-up, then a closed loop per level; with each level's
    CPU seconds per image (the server's process tree, all its threads)."""

    body = generation_body(args.size, args.steps)

    await closed_loop(base_url, 2, 4, body)
    rows = {}
    for level in LEVELS:
        before = sum(thread_cpu_s(root).values())
        result = await closed_loop(base_url, level, max(16, level * args.per_worker), body)
        cpu_s = sum(thread_cpu_s(root).values()) - before
        rows[level] = {**result.summary(), "cpu_s_per_image": round(cpu_s / result.images, 3)}
        print(rows[level], flush=True)
    return rows


async def edit_load(base_url: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Closed loops of edits (each request its own input picture), with and without a mask,
    after a warm-up of each kind (the diffusers engine builds its img2img and inpaint
    pipelines on first use)."""
    side = int(args.size.split("x")[0])
    mask = Image.new("RGBA", (side, side), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, side // 2, side))  # the left half is edited
    mask_buffer = io.BytesIO()
    mask.save(mask_buffer, format="PNG")

    def body(index: int) -> dict[str, Any]:
        return {"prompt": f"edit {index}", "num_inference_steps": args.steps, "seed": index}

    def uploads(masked: bool) -> Any:
        def files(index: int) -> dict[str, tuple[str, bytes, str]]:
            sent = {"image": ("in.png", input_png(index, side), "image/png")}
            if masked:
                sent["mask"] = ("mask.png", mask_buffer.getvalue(), "image/png")
            return sent

        return files

    for masked in (False, True):
        await closed_loop(base_url, 2, 4, body, files=uploads(masked))
    rows = {}
    for name, (level, masked) in EDIT_LEVELS.items():
        requests = max(16, level * args.per_worker)
        result = await closed_loop(base_url, level, requests, body, files=uploads(masked))
        rows[name] = result.summary()
        print(name, rows[name], flush=True)
    return rows


def measure_start(engine: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Start `engine`, time it to healthy, load it under the memory sampler; one row."""
    port = free_port()
    command = vllm_serve_command(args.model, port, "--image-engine", engine)
    started = time.perf_counter()
    with running_server(command, port, log) as base_url:
        startup_s = time.perf_counter() - started
        root = server_tree(port)
        with Sampler(root) as sampler:
            idle_mib = sampler.memory_mib()
            threads_before = thread_cpu_s(root)
            by_level = asyncio.run(load(base_url, root, args))
            by_edit = asyncio.run(edit_load(base_url, args))
            threads_after = thread_cpu_s(root)
        # The thread that did the most work: its niceness is the engine's compute priority.
        busiest = max(
            threads_after, key=lambda tid: threads_after[tid] - threads_before.get(tid, 0.0)
        )
        compute_nice = os.getpriority(os.PRIO_PROCESS, busiest)
        processes = len(tree_processes(root))
    row: dict[str, Any] = {
        "engine": engine,
        "startup_s": round(startup_s, 2),
        "processes": processes,
        "compute_nice": compute_nice,
        "idle_rss_mib": round(idle_mib),
        "peak_rss_mib": round(max([idle_mib, *sampler.rss_mib])),
    }
    for level, result in by_level.items():
        row[f"c{level}_images_per_s"] = result["images_per_s"]
        row[f"c{level}_p50_ms"] = result["p50_ms"]
        row[f"c{level}_cpu_s_per_image"] = result["cpu_s_per_image"]
    for name, result in by_edit.items():
        row[f"{name}_images_per_s"] = result["images_per_s"]
    loads = [*by_level.values(), *by_edit.values()]
    row["lost_or_failed"] = sum(r["lost_or_failed"] for r in loads)
    row["duplicated_images"] = sum(r["duplicated_images"] for r in loads)
    print(row, flush=True)
    return row


def rule(throughput: dict[str, float], startup: float, measure: str) -> tuple[bool, str]:
    """The issue's rule on omni / diffusers throughput per level (as `measure` gives it) and
    start-up: whether omni should be `auto`'s choice on the CPU, and the sentence."""
    met = all(r >= 1 - THROUGHPUT_WITHIN for r in throughput.values()) and startup < STARTUP_UNDER
    measured = ", ".join(f"{r:.2f} ({load})" for load, r in throughput.items())
    conclusion = (
        "**met: `--image-engine auto` should pick omni on the CPU**"
        if met
        else "**not met: `--image-engine auto` should keep diffusers on the CPU**"
    )
    return met, (
        f"The rule on {measure}: omni's throughput within {THROUGHPUT_WITHIN:.0%} of "
        f"diffusers' (at least {1 - THROUGHPUT_WITHIN:.2f}; here {measured}) and its start-up "
        f"under {STARTUP_UNDER}x (here {startup:.2f}x): {conclusion}.\n"
    )


def verdicts(
    summary: dict[str, dict[str, float]], nice: dict[str, set[int]]
) -> tuple[dict[str, bool], str]:
    """The rule on img/s, as the issue words it, and on CPU time per image (diffusers' over
    omni's: the throughput each would have with the cores to itself), which a shared machine
    does not skew; and a warning where the engines compute at different priorities."""
    ratios, startup = summary["ratio"], summary["ratio"]["startup_s"]
    by_rate, rate_text = rule(
        {
            **{f"concurrency {level}": ratios[f"c{level}_images_per_s"] for level in LEVELS},
            **{name: ratios[f"{name}_images_per_s"] for name in EDIT_LEVELS},
        },
        startup,
        "img/s",
    )
    by_cpu, cpu_text = rule(
        {f"concurrency {level}": 1 / ratios[f"c{level}_cpu_s_per_image"] for level in LEVELS},
        startup,
        "CPU time per image (diffusers' / omni's)",
    )
    text = f"{rate_text}\n{cpu_text}"
    if nice["diffusers"] != nice["omni"]:
        text += (
            f"\nThe engines compute at different priorities (niceness of the busiest thread: "
            f"diffusers {sorted(nice['diffusers'])}, omni {sorted(nice['omni'])}; the diffusers "
            f"engine lowers its own, `engine/cpu_priority.py`). On a machine busy with other "
            f"work the lower-priority engine gets less CPU, so img/s and latency favour the "
            f"other; CPU time per image does not depend on it.\n"
        )
    return {"img/s": by_rate, "cpu_time": by_cpu}, text


def main() -> None:
    parser = benchmark_parser(__doc__, size="256x256", steps=4)
    parser.add_argument("--rounds", type=int, default=3, help="starts of each engine")
    parser.add_argument("--per-worker", type=int, default=2, help="requests per worker")
    parser.add_argument("--logs", type=Path, default=None, help="keep the servers' logs here")
    parser.add_argument("--shared", action="store_true", help="say so: other work ran too")
    args = parser.parse_args()
    ensure_tiny_model()
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        logs = args.logs or Path(scratch)
        logs.mkdir(parents=True, exist_ok=True)
        for run in range(args.rounds):
            order = ENGINES if run % 2 == 0 else ENGINES[::-1]  # alternating
            for engine in order:
                row = measure_start(engine, args, logs / f"{engine}-{run + 1}.log")
                rows.append({"round": run + 1, **row})
    summary: dict[str, dict[str, float]] = {
        engine: {
            key: median([row[key] for row in rows if row["engine"] == engine]) for key in FIGURES
        }
        for engine in ENGINES
    }
    summary["ratio"] = {
        key: round(summary["omni"][key] / summary["diffusers"][key], 3) for key in FIGURES
    }
    nice = {engine: {row["compute_nice"] for row in rows if row["engine"] == engine}
            for engine in ENGINES}  # fmt: skip
    verdict_by, rules = verdicts(summary, nice)
    state = checkout()
    table = [
        {
            "figure": label,
            "diffusers": summary["diffusers"][key],
            "omni": summary["omni"][key],
            "omni / diffusers": f"**{summary['ratio'][key]:.2f}**",
        }
        for key, label in FIGURES.items()
    ]
    columns = ["round", "engine", *FIGURES, "compute_nice", "processes", "idle_rss_mib",
               "lost_or_failed", "duplicated_images"]  # fmt: skip
    body = (
        f"Medians of {args.rounds} starts of each engine; commit {state}; "
        f"{machine_load(load_before)}.\n\n"
        + markdown_table(table, ["figure", "diffusers", "omni", "omni / diffusers"])
        + "\n"
        + rules
        + "\nEach start:\n\n"
        + markdown_table(rows, columns)
    )
    publish(
        "engines_cpu",
        title=f"The engines on the CPU: omni against diffusers ({args.model}, {args.size}, "
        f"{args.steps} steps)",
        intro="Both engines with the server's defaults otherwise, started alternately; at "
        "concurrency 1 and 8 a closed loop of at least 16 requests each (after a warm-up), "
        "memory sampled every 0.5 s meanwhile." + (f" {SHARED_NOTE}" if args.shared else ""),
        body=body,
        results={
            "checkout": state,
            "rows": rows,
            "medians": summary,
            "omni_should_be_cpu_default_by": verdict_by,
            "shared_machine": args.shared,
        },
    )


if __name__ == "__main__":
    main()
