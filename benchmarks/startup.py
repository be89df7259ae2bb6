"""Start-up: seconds from `vllm serve <model> --task image` to a 200 from `/health`.

    .venv/bin/python -m benchmarks.startup               # writes docs/benchmarks/startup.md
    git worktree add /tmp/before HEAD~3
    .venv/bin/python -m benchmarks.startup --against /tmp/before   # side by side

With `--against`, starts alternate between this checkout and another one of this project
(put first on `PYTHONPATH`, so its `vllm_omni_images` is the one vLLM loads), and the table
gives both and their ratio: the way to tell whether a change made start-up slower.

Each run starts a fresh process with the embedded model already built and cached, so the
figure (to the 0.5 s at which `/health` is polled) is what a user waits for on a second
start: Python and vLLM imports, the plugin, the engine's model load and vLLM's app. A change
that imports more at start-up shows here.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.report import benchmark_parser, markdown_table, median, publish
from testing.server_process import free_port, running_server, vllm_serve_command
from vllm_omni_images.tiny_model import ensure_tiny_model


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--against", type=Path, default=None, help="another checkout to compare with"
    )
    args = parser.parse_args()
    ensure_tiny_model()
    trees: dict[str, dict[str, str]] = {"this checkout": {}}
    if args.against is not None:
        commit = subprocess.run(
            ["git", "-C", str(args.against), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        trees[f"{args.against} ({commit or 'not a git checkout'})"] = {
            "PYTHONPATH": str(args.against.resolve())
        }
    seconds: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as logs:
        for run in range(args.runs):
            for name, env in trees.items():  # alternating, so drift hits both alike
                port = free_port()
                started = time.perf_counter()
                command = vllm_serve_command(args.model, port)
                log = Path(logs) / f"serve-{run}-{len(seconds[name])}-{abs(hash(name))}.log"
                with running_server(command, port, log, env=env):
                    seconds[name].append(time.perf_counter() - started)
    columns = ["run", *trees]
    rows = [
        {"run": run + 1, **{name: round(seconds[name][run], 2) for name in trees}}
        for run in range(args.runs)
    ]
    summary = "".join(
        f"\nMedian, {name}: **{median(values):.2f} s** (min {min(values):.2f}, "
        f"max {max(values):.2f}).\n"
        for name, values in seconds.items()
    )
    results: dict[str, object] = {
        name: {"runs_s": [round(v, 3) for v in values], "median_s": median(values)}
        for name, values in seconds.items()
    }
    if args.against is not None:
        mine, theirs = (median(values) for values in seconds.values())
        summary += f"\nRatio this checkout / {list(trees)[1]}: **{mine / theirs:.3f}**.\n"
        results["ratio"] = mine / theirs
    publish(
        "startup",
        title=f"Start-up to a healthy server ({args.model})",
        intro=f"{args.runs} starts of each, one after another, the model already cached.",
        body=markdown_table(rows, columns) + summary,
        results=results,
    )


if __name__ == "__main__":
    main()
