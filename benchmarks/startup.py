"""Start-up: seconds from `vllm serve <model> --task image` to a 200 from `/health`.

    .venv/bin/python -m benchmarks.startup               # writes docs/benchmarks/startup.md

Each run starts a fresh process with the embedded model already built and cached, so the
figure (to the 0.5 s at which `/health` is polled) is what a user waits for on a second
start: Python and vLLM imports, the plugin, the engine's model load and vLLM's app. A change
that imports more at start-up shows here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.report import benchmark_parser, markdown_table, median, publish
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.tiny_model import ensure_tiny_model


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ensure_tiny_model()
    seconds: list[float] = []
    with tempfile.TemporaryDirectory() as logs:
        for run in range(args.runs):
            port = free_port()
            started = time.perf_counter()
            command = vllm_serve_command(args.model, port)
            with running_server(command, port, Path(logs) / f"serve-{run}.log"):
                seconds.append(time.perf_counter() - started)
    rows = [{"run": index + 1, "seconds": round(value, 2)} for index, value in enumerate(seconds)]
    publish(
        "startup",
        title=f"Start-up to a healthy server ({args.model})",
        intro=f"{args.runs} starts, one after another, the model already cached.",
        body=markdown_table(rows, ["run", "seconds"])
        + f"\nMedian: **{median(seconds):.2f} s** (min {min(seconds):.2f}, "
        f"max {max(seconds):.2f}).\n",
        results={"runs_s": [round(value, 3) for value in seconds], "median_s": median(seconds)},
    )


if __name__ == "__main__":
    main()
