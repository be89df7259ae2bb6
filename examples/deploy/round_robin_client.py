"""Round-robin image requests over several `vllm serve <model> --task image` replicas that share
an image store, as a load balancer would spread them, with the official `openai` SDK.

Each request goes to the next replica in turn and asks for `response_format: "url"`; the URL it
gets back is then fetched from a *different* replica, which answers it by reading the shared
bucket. Meanwhile every replica's `/metrics` is read, as a router or an autoscaler reads it:
`vllm:num_requests_running` and `vllm:num_requests_waiting`. Exits with status 1 if any request
fails, any URL is not answered by another replica, the gauges never showed a request (they are
read every 20 ms, and each request takes longer than that), or a gauge is not back at 0 at the
end.

    python examples/deploy/round_robin_client.py \\
        --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002 --requests 8
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Outcome:
    index: int
    made_by: str
    fetched_from: str
    ok: bool
    detail: str


def load_gauges(replica: str) -> dict[str, float]:
    """A replica's load as vLLM's routers read it: each gauge summed over its series."""
    text = httpx.get(f"{replica}/metrics", timeout=5).text
    totals = dict.fromkeys(GAUGES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


def on_replica(url: str, replica: str) -> str:
    """The same path on another replica (a URL carries the host that answered the request)."""
    return replica + urlsplit(url).path


def one_request(index: int, replicas: list[str], api_key: str, prompt: str) -> Outcome:
    made_by = replicas[index % len(replicas)]
    fetched_from = replicas[(index + 1) % len(replicas)]
    client = OpenAI(base_url=f"{made_by}/v1", api_key=api_key, max_retries=0)
    try:
        response = client.images.generate(
            prompt=f"{prompt} #{index}", size="256x256", response_format="url"
        )
        url = (response.data or [])[0].url or ""
        image = httpx.get(on_replica(url, fetched_from), timeout=30)  # no API key: a browser
    except Exception as error:
        return Outcome(index, made_by, fetched_from, False, f"{type(error).__name__}: {error}")
    ok = image.status_code == 200 and image.content.startswith(PNG_SIGNATURE)
    detail = f"{image.status_code} {image.headers.get('content-type')} {len(image.content)} bytes"
    return Outcome(index, made_by, fetched_from, ok, detail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replica", action="append", required=True, help="a replica's root URL")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--prompt", default="a lighthouse at dawn")
    args = parser.parse_args()
    replicas = [url.rstrip("/") for url in args.replica]

    peaks: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(GAUGES, 0.0))
    done = threading.Event()

    def watch() -> None:  # as a router's scraper does, but every 20 ms
        while not done.is_set():
            for replica in replicas:
                for name, value in load_gauges(replica).items():
                    peaks[replica][name] = max(peaks[replica][name], value)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(args.concurrency) as pool:
        outcomes = list(
            pool.map(
                lambda i: one_request(i, replicas, args.api_key, args.prompt),
                range(args.requests),
            )
        )
    done.set()
    watcher.join()

    for outcome in outcomes:
        print(
            f"request {outcome.index}: made by {outcome.made_by}, URL fetched from "
            f"{outcome.fetched_from}: {'ok' if outcome.ok else 'FAILED'} ({outcome.detail})"
        )
    failed = [outcome for outcome in outcomes if not outcome.ok]
    settled = True
    seen = any(peaks[replica][GAUGES[0]] for replica in replicas)
    for replica in replicas:
        peak = peaks[replica]
        now = load_gauges(replica)
        settled = settled and not any(now.values())
        print(
            f"{replica}: peak running {peak[GAUGES[0]]:g}, peak waiting {peak[GAUGES[1]]:g}; "
            f"now running {now[GAUGES[0]]:g}, waiting {now[GAUGES[1]]:g}"
        )
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} images made on one replica and "
          "served by another")  # fmt: skip
    if not seen:
        print("the load gauges never showed a running request")
    if not settled:
        print("a load gauge is not back at 0 with every request answered")
    return 0 if not failed and seen and settled else 1


if __name__ == "__main__":
    sys.exit(main())
