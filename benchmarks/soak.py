"""Soak: thousands of mixed requests against `vllm serve`, with clients that leave mid-request
and malformed requests among them, run twice; every answer is checked and the server's memory,
threads, descriptors and files are sampled.

    .venv/bin/python -m benchmarks.soak                  # writes docs/benchmarks/soak.md
    .venv/bin/python -m benchmarks.soak --requests 200   # a quick look

Each round sends the same `--requests` requests (default 2,000) from `--concurrency` clients
(default 32). Request `i` is drawn from a generator seeded with `i`, so both rounds send the
same requests:

- 85 % are kept: a size of 64-256 px, `n` 1-3, a seed of their own, 10 % of them with
  `response_format: url` (the URL is then fetched). The answer must be 200 with `n` PNGs of the
  asked size, and the same pixels (within 1/255: batching) in both rounds.
- 10 % disconnect: the client gives up after 20-400 ms, mid-request.
- 5 % are malformed (bad JSON, unknown fields, bad values, wrong content type, a non-image
  upload): each must get a 4xx in OpenAI's error shape.

Between rounds the server must be idle again (no queued or running images in `/metrics`);
its resident memory, threads and open descriptors are sampled every 0.5 s; image URLs expire
(`--image-url-ttl 15`) and their files must be gone at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

from benchmarks.report import benchmark_parser, markdown_table, publish
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.images.encoding import decode_image_base64

SIZES = ["64x64", "128x128", "64x128", "128x64", "96x160", "256x256"]
URL_TTL_S = 15
DISCONNECT_SHARE = 0.10
MALFORMED_SHARE = 0.05
URL_SHARE = 0.10


@dataclass(frozen=True)
class Malformed:
    label: str
    send: Callable[[httpx.AsyncClient], Any]


def malformed_requests() -> list[Malformed]:
    """Bad requests a client might send; each must get a 4xx with OpenAI's error shape."""

    def post_json(body: Any) -> Callable[[httpx.AsyncClient], Any]:
        return lambda client: client.post("/v1/images/generations", json=body)

    def post_raw(content: bytes, content_type: str) -> Callable[[httpx.AsyncClient], Any]:
        headers = {"Content-Type": content_type}
        return lambda client: client.post(
            "/v1/images/generations", content=content, headers=headers
        )

    def edit(files: dict[str, Any], data: dict[str, str]) -> Callable[[httpx.AsyncClient], Any]:
        return lambda client: client.post("/v1/images/edits", files=files, data=data)

    return [
        Malformed("invalid JSON", post_raw(b'{"prompt": "x",', "application/json")),
        Malformed("JSON array", post_json(["prompt"])),
        Malformed("missing prompt", post_json({"size": "64x64"})),
        Malformed("empty prompt", post_json({"prompt": ""})),
        Malformed("unknown field", post_json({"prompt": "x", "num_inference_step": 2})),
        Malformed("size banana", post_json({"prompt": "x", "size": "banana"})),
        Malformed("size too large", post_json({"prompt": "x", "size": "100000x100000"})),
        Malformed("n = 0", post_json({"prompt": "x", "n": 0})),
        Malformed("steps -1", post_json({"prompt": "x", "num_inference_steps": -1})),
        Malformed("seed 2^70", post_json({"prompt": "x", "seed": 2**70})),
        Malformed("text/plain", post_raw(b"prompt=x", "text/plain")),
        Malformed("edit without image", edit({}, {"prompt": "x"})),
        Malformed(
            "edit with a text file",
            edit({"image": ("a.png", b"not an image", "image/png")}, {"prompt": "x"}),
        ),
    ]


@dataclass
class RoundResult:
    sent: int = 0
    kept: int = 0
    kept_ok: int = 0
    disconnected: int = 0
    disconnect_completed: int = 0
    malformed: int = 0
    malformed_4xx: int = 0
    problems: list[str] = field(default_factory=list)
    images: int = 0
    wall_s: float = 0.0
    pixels: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)
    digests: set[str] = field(default_factory=set, repr=False)
    duplicated: int = 0


def plan(index: int) -> tuple[str, dict[str, Any], random.Random]:
    """What request `index` is: ("kept" | "disconnect" | "malformed", body, its generator)."""
    rng = random.Random(index)
    draw = rng.random()
    kind = (
        "malformed"
        if draw < MALFORMED_SHARE
        else "disconnect"
        if draw < MALFORMED_SHARE + DISCONNECT_SHARE
        else "kept"
    )
    body: dict[str, Any] = {
        "prompt": f"soak request {index}",
        "size": rng.choice(SIZES),
        "n": rng.randint(1, 3),
        "seed": index * 10,  # n <= 3, so no two requests share a seed
        "num_inference_steps": 2,
    }
    if kind == "disconnect":
        body["num_inference_steps"] = 8  # long enough to leave in the middle
    if kind == "kept" and rng.random() < URL_SHARE:
        body["response_format"] = "url"
    return kind, body, rng


async def one_request(
    client: httpx.AsyncClient, index: int, result: RoundResult, bad: list[Malformed]
) -> None:
    kind, body, rng = plan(index)
    result.sent += 1
    if kind == "malformed":
        result.malformed += 1
        case = bad[rng.randrange(len(bad))]
        response = await case.send(client)
        if 400 <= response.status_code < 500 and _is_openai_error(response):
            result.malformed_4xx += 1
        else:
            result.problems.append(f"{case.label}: {response.status_code} {response.text[:200]}")
        return
    if kind == "disconnect":
        result.disconnected += 1
        try:
            await asyncio.wait_for(
                client.post("/v1/images/generations", json=body), timeout=rng.uniform(0.02, 0.4)
            )
            result.disconnect_completed += 1
        except TimeoutError:
            pass
        return
    result.kept += 1
    response = await client.post("/v1/images/generations", json=body)
    try:
        images = await _images_of(client, response, body)
    except AssertionError as error:
        result.problems.append(f"request {index}: {error}")
        return
    result.kept_ok += 1
    result.images += len(images)
    result.pixels[index] = images
    for image in images:
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        if digest in result.digests:
            result.duplicated += 1
        result.digests.add(digest)


async def _images_of(
    client: httpx.AsyncClient, response: httpx.Response, body: dict[str, Any]
) -> list[np.ndarray]:
    assert response.status_code == 200, f"{response.status_code} {response.text[:200]}"
    data = response.json()["data"]
    assert len(data) == body["n"], f"{len(data)} images for n={body['n']}"
    width, height = (int(side) for side in body["size"].split("x"))
    images = []
    for item in data:
        if body.get("response_format") == "url":
            fetched = await client.get(item["url"])
            assert fetched.status_code == 200, f"url: {fetched.status_code}"
            image: Image.Image = Image.open(io.BytesIO(fetched.content))
        else:
            image = decode_image_base64(item["b64_json"])
        assert image.format == "PNG", image.format
        assert image.size == (width, height), f"{image.size} for {body['size']}"
        images.append(np.asarray(image.convert("RGB")))
    return images


def _is_openai_error(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


async def run_round(base_url: str, requests: int, concurrency: int) -> RoundResult:
    result = RoundResult()
    bad = malformed_requests()
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            try:
                await one_request(client, index, result, bad)
            except httpx.HTTPError as error:
                result.problems.append(f"request {index}: {type(error).__name__}: {error}")

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


def metrics(base_url: str) -> dict[str, float]:
    """The `vllm:image_*` samples of `/metrics`, keyed by name and labels."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:image_"):
            name, _, value = line.rpartition(" ")
            values[
                name.replace(',model_name="tiny-qwen-image"', "").replace(
                    'model_name="tiny-qwen-image",', ""
                )
            ] = float(value)
    return values


def outcomes(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    prefix = "vllm:image_requests_total{outcome="
    return {
        name[len(prefix) + 1 : -2]: int(after[name] - before.get(name, 0.0))
        for name in after
        if name.startswith(prefix) and after[name] - before.get(name, 0.0)
    }


def wait_idle(base_url: str, timeout_s: float = 120) -> float:
    """Seconds until no image is queued or running (the cancelled ones finish their step)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        sample = metrics(base_url)
        busy = sum(
            value
            for name, value in sample.items()
            if name.startswith(("vllm:image_queue_images", "vllm:image_running_images"))
        )
        if busy == 0:
            return time.monotonic() - start
        time.sleep(0.5)
    raise RuntimeError(f"the server is still busy after {timeout_s} s")


class Sampler:
    """Samples a process's resident memory, threads and descriptors every 0.5 s."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.rss_mib: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.rss_mib.append(self.memory_mib())

    def memory_mib(self) -> float:
        return sum(p.memory_info().rss for p in self._tree()) / 2**20

    def threads(self) -> int:
        return sum(p.num_threads() for p in self._tree())

    def fds(self) -> int:
        return sum(p.num_fds() for p in self._tree())

    def _tree(self) -> list[psutil.Process]:
        return [self.process, *self.process.children(recursive=True)]

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def listener(port: int) -> psutil.Process:
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == "LISTEN":
            assert connection.pid is not None
            return psutil.Process(connection.pid)
    raise RuntimeError(f"nothing listens on {port}")


def compare_rounds(first: RoundResult, second: RoundResult) -> tuple[int, int, int]:
    """(requests compared, images compared, the largest pixel difference)."""
    compared = images = 0
    largest = 0
    for index, pixels in first.pixels.items():
        again = second.pixels.get(index)
        if again is None:
            continue
        compared += 1
        for a, b in zip(pixels, again, strict=True):
            images += 1
            largest = max(largest, int(np.abs(a.astype(int) - b.astype(int)).max()))
    return compared, images, largest


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    port = free_port()
    store = Path(tempfile.mkdtemp(prefix="soak-store-"))
    log = Path(tempfile.mkdtemp(prefix="soak-log-")) / "serve.log"
    command = vllm_serve_command(
        args.model, port, "--image-store-dir", str(store), "--image-url-ttl", str(URL_TTL_S)
    )
    with running_server(command, port, log) as base_url:
        server = listener(port)
        with Sampler(server) as sampler:
            asyncio.run(run_round(base_url, 64, 8))  # warm-up: lazy initialisation
            wait_idle(base_url)
            baseline: dict[str, float] = {
                "rss_mib": sampler.memory_mib(),
                "threads": sampler.threads(),
                "fds": sampler.fds(),
            }
            rounds: list[tuple[RoundResult, dict[str, Any]]] = []
            for number in (1, 2):
                before = metrics(base_url)
                result = asyncio.run(run_round(base_url, args.requests, args.concurrency))
                idle_after_s = wait_idle(base_url)
                after = metrics(base_url)
                rounds.append(
                    (
                        result,
                        {
                            "round": number,
                            "rss_mib": round(sampler.memory_mib(), 1),
                            "threads": sampler.threads(),
                            "fds": sampler.fds(),
                            "idle_after_s": round(idle_after_s, 1),
                            "outcomes": outcomes(before, after),
                        },
                    )
                )
                print(result, rounds[-1][1], flush=True)
            time.sleep(URL_TTL_S + 10)  # every URL expired; the clean-up has run
            stored_files = sorted(p.name for p in store.iterdir())
            peak_rss = max(sampler.rss_mib)
    compared, images_compared, largest_diff = compare_rounds(rounds[0][0], rounds[1][0])

    rows: list[dict[str, Any]] = []
    for result, sample in rounds:
        rows.append(
            {
                "round": sample["round"],
                "requests": result.sent,
                "kept": result.kept,
                "kept_ok": result.kept_ok,
                "disconnected": result.disconnected,
                "finished_before_leaving": result.disconnect_completed,
                "malformed": result.malformed,
                "malformed_4xx": result.malformed_4xx,
                "problems": len(result.problems),
                "duplicated_images": result.duplicated,
                "images": result.images,
                "wall_s": round(result.wall_s, 1),
                "rss_mib": sample["rss_mib"],
                "threads": sample["threads"],
                "fds": sample["fds"],
                "idle_after_s": sample["idle_after_s"],
            }
        )
    verdict = {
        "lost": sum(r.kept - r.kept_ok for r, _ in rounds),
        "malformed_not_4xx": sum(r.malformed - r.malformed_4xx for r, _ in rounds),
        "rss_growth_round_1_mib": round(float(rows[0]["rss_mib"]) - baseline["rss_mib"], 1),
        "rss_growth_round_2_mib": round(float(rows[1]["rss_mib"]) - float(rows[0]["rss_mib"]), 1),
        "peak_rss_mib": round(peak_rss, 1),
        "threads_baseline_round_1_round_2": [
            baseline["threads"],
            rounds[0][1]["threads"],
            rounds[1][1]["threads"],
        ],
        "fds_baseline_round_1_round_2": [baseline["fds"], rounds[0][1]["fds"], rounds[1][1]["fds"]],
        "stored_files_after_expiry": len(stored_files),
        "requests_compared_across_rounds": compared,
        "images_compared_across_rounds": images_compared,
        "largest_pixel_difference_across_rounds": largest_diff,
    }
    problems = [p for r, _ in rounds for p in r.problems][:20]
    server_outcomes = {f"round {s['round']}": s["outcomes"] for _, s in rounds}
    publish(
        "soak",
        title="Soak: mixed load, disconnects and malformed requests, twice",
        intro=(
            f"`vllm serve {args.model} --task image` on this machine; {args.requests} requests "
            f"per round at concurrency {args.concurrency} (sizes {', '.join(SIZES)}, `n` 1-3, 2 "
            f"steps; {DISCONNECT_SHARE:.0%} of clients leave after 20-400 ms, "
            f"{MALFORMED_SHARE:.0%} malformed, {URL_SHARE:.0%} of the kept ones as URLs)."
        ),
        body=markdown_table(rows, list(rows[0]))
        + "\n\n**Verdict**\n\n```json\n"
        + json.dumps(verdict, indent=2)
        + "\n```\n\n**Outcomes the server counted** (`vllm:image_requests_total` deltas)\n\n"
        + "```json\n"
        + json.dumps(server_outcomes, indent=2)
        + "\n```\n\n**Problems** (first 20)\n\n"
        + ("\n".join(f"- {p}" for p in problems) if problems else "none")
        + "\n",
        results={
            "rows": rows,
            "verdict": verdict,
            "baseline": baseline,
            "outcomes": server_outcomes,
            "problems": problems,
        },
    )


if __name__ == "__main__":
    main()
