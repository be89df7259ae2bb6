"""A closed-loop HTTP load generator: concurrent clients of `/v1/images/generations` (JSON), or
of `/v1/images/edits` (multipart) when the requests carry files."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.report import percentile

if TYPE_CHECKING:
    import httpx


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


def generation_body(size: str, steps: int) -> Callable[[int], dict[str, Any]]:
    """The generation request a load benchmark sends as its `index`-th: the same prompt and
    knobs each time, a seed of its own (so no two images are alike)."""

    def body(index: int) -> dict[str, Any]:
        return {
            "prompt": f"benchmark request {index}",
            "size": size,
            "num_inference_steps": steps,
            "seed": index,
        }

    return body


async def closed_loop(
    base_url: str,
    concurrency: int,
    requests: int,
    body: Callable[[int], dict[str, Any]],
    timeout_s: float = 600.0,
    files: Callable[[int], dict[str, tuple[str, bytes, str]]] | None = None,
) -> LoadResult:
    """`concurrency` workers send `requests` image requests back to back; every response is
    checked: status 200, `n` images, each image unique across the run. With `files`, each
    request is an edit: `body` as form fields, `files(index)` as its uploads."""
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
                if files is None:
                    response = await client.post("/v1/images/generations", json=payload)
                else:
                    form = {key: str(value) for key, value in payload.items()}
                    response = await client.post("/v1/images/edits", data=form, files=files(index))
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


async def sweep(
    base_url: str,
    levels: list[int],
    per_worker: int,
    body: Callable[[int], dict[str, Any]],
    label: str,
    files: Callable[[int], dict[str, tuple[str, bytes, str]]] | None = None,
) -> list[dict[str, Any]]:
    """A warm-up (first calls pay for lazy initialisation in torch and the server), then one
    `closed_loop` per concurrency level, `per_worker` requests each (at least 16): a table row
    per level, labelled `label`."""
    await closed_loop(base_url, 2, 4, body, files=files)
    rows = []
    for concurrency in levels:
        requests = max(16, concurrency * per_worker)
        result = await closed_loop(base_url, concurrency, requests, body, files=files)
        row = {"server": label, **result.summary()}
        print(row, flush=True)
        rows.append(row)
    return rows
