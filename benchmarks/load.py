"""A closed-loop HTTP load generator and the statistics the benchmarks report."""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (the value at or below which `fraction` of samples lie)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    ok: int
    images: int
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    failures: dict[str, int]
    duplicated_images: int

    @property
    def throughput_images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def lost(self) -> int:
        return self.requests - self.ok

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": self.ok,
            "lost_or_failed": self.lost,
            "duplicated_images": self.duplicated_images,
            "failures": self.failures,
            "images_per_s": round(self.throughput_images_per_s, 3),
            "p50_ms": round(percentile(self.latencies_s, 0.5) * 1e3, 1),
            "p99_ms": round(percentile(self.latencies_s, 0.99) * 1e3, 1),
        }


async def closed_loop(
    base_url: str,
    concurrency: int,
    requests: int,
    body: Callable[[int], dict[str, Any]],
    timeout_s: float = 600.0,
) -> LoadResult:
    """`concurrency` workers send `requests` image requests back to back; every response is
    checked: status 200, `n` images, each image unique across the run."""
    next_index = 0
    latencies: list[float] = []
    failures: dict[str, int] = {}
    images_seen: set[str] = set()
    duplicated = 0
    ok = 0
    images = 0

    import httpx  # here, so the engine benchmark runs where httpx is not installed

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, duplicated, ok, images
        while next_index < requests:
            index = next_index
            next_index += 1
            payload = body(index)
            start = time.perf_counter()
            try:
                response = await client.post("/v1/images/generations", json=payload)
            except httpx.HTTPError as error:
                failures[type(error).__name__] = failures.get(type(error).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                key = str(response.status_code)
                failures[key] = failures.get(key, 0) + 1
                continue
            data = response.json()["data"]
            if len(data) != payload.get("n", 1):
                failures["wrong_count"] = failures.get("wrong_count", 0) + 1
                continue
            for item in data:
                if item["b64_json"] in images_seen:
                    duplicated += 1
                images_seen.add(item["b64_json"])
            ok += 1
            images += len(data)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    return LoadResult(concurrency, requests, ok, images, wall_s, latencies, failures, duplicated)


def machine() -> dict[str, Any]:
    import os

    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def run_description(module: str, info: dict[str, Any]) -> str:
    """How a result was produced: the exact command, the machine, the commit and the date."""
    command = " ".join(["python -m", module, *sys.argv[1:]])
    return (
        f"`{command}` on {info['cores']} cores ({info['cpu']}), GPU: {info['gpu']}, "
        f"torch {info['torch']}, commit {info['commit']}, {info['date']}."
    )


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(name: str, results: dict[str, Any], markdown: str) -> Path:
    """Write `docs/benchmarks/<name>.json` and `<name>.md`; return the markdown's path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(markdown)
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def median(values: list[float]) -> float:
    return statistics.median(values)


__all__ = [
    "LoadResult",
    "asdict",
    "closed_loop",
    "machine",
    "markdown_table",
    "median",
    "percentile",
    "run_description",
    "write_results",
]
