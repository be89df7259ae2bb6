"""The serving benchmarks of this checkout side by side with another checkout's.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m benchmarks.against /tmp/before     # writes docs/benchmarks/against.md

Runs `benchmarks.overhead`, `benchmarks.throughput` and `benchmarks.liveness` alternately for
this checkout and the other, `--rounds` times each (the order flips every round, so drift hits
both alike), and tables each one's headline figures: the median per checkout and their ratio.
The measuring code is this checkout's for both; only the server differs (the other checkout
is put first on `PYTHONPATH`, so its `vllm_omni_images` is the one `vllm serve` loads), as in
`benchmarks.startup --against`. Each benchmark's own page (`docs/benchmarks/<name>.md`) is left
as it was: only `against.md` is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.report import RESULTS_DIR, markdown_table, median, publish

Figures = Callable[[dict[str, Any]], dict[str, float]]


def overhead(results: dict[str, Any]) -> dict[str, float]:
    served = results["rows"][0]
    return {
        "served p50 ms": served["p50_ms"],
        "served p99 ms": served["p99_ms"],
        "served / direct p50": results["ratio"],
    }


def throughput(results: dict[str, Any]) -> dict[str, float]:
    by = {(row["server"], row["concurrency"]): row for row in results["rows"]}
    on = next(row["server"] for row in results["rows"] if row["server"].startswith("batching on"))
    return {
        "batching on c1 img/s": by[(on, 1)]["images_per_s"],
        "batching on c8 img/s": by[(on, 8)]["images_per_s"],
        "batching on c16 img/s": by[(on, 16)]["images_per_s"],
        "batching off c8 img/s": by[("batching off", 8)]["images_per_s"],
        "batching on c8 p50 ms": by[(on, 8)]["p50_ms"],
        "lost or failed": results["ratios"]["lost_or_failed"],
    }


def liveness(results: dict[str, Any]) -> dict[str, float]:
    idle, saturated = results["rows"]
    return {
        "/health idle p50 ms": idle["p50_ms"],
        "/health saturated p50 ms": saturated["p50_ms"],
        "/health saturated p99 ms": saturated["p99_ms"],
    }


BENCHMARKS: dict[str, Figures] = {
    "overhead": overhead,
    "throughput": throughput,
    "liveness": liveness,
}


def run_once(name: str, env: dict[str, str], extra: list[str]) -> dict[str, Any]:
    """Run `benchmarks.<name>` and return the results it wrote."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *extra]
    subprocess.run(command, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    results: dict[str, Any] = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="another checkout of this project")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="benchmarks to run")
    args = parser.parse_args()
    other = args.other.resolve()
    commit = subprocess.run(
        ["git", "-C", str(other), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    trees = {"this checkout": {}, f"other ({commit or other})": {"PYTHONPATH": str(other)}}
    names = args.only.split(",")
    figures: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as kept:
        pages = [RESULTS_DIR / f"{name}{suffix}" for name in names for suffix in (".json", ".md")]
        for page in pages:
            if page.exists():
                shutil.copy(page, Path(kept) / page.name)
        try:
            for round_index in range(args.rounds):
                order = list(trees) if round_index % 2 else list(reversed(trees))
                for name in names:
                    for tree in order:
                        print(f"round {round_index + 1}: {name} on {tree}", flush=True)
                        results = run_once(name, trees[tree], [])
                        for figure, value in BENCHMARKS[name](results).items():
                            figures.setdefault((name, figure, tree), []).append(value)
        finally:  # each benchmark's own page, as it was
            for page in pages:
                if (Path(kept) / page.name).exists():
                    shutil.copy(Path(kept) / page.name, page)
    mine, theirs = trees
    rows = []
    for name in names:
        for figure in dict.fromkeys(f for (n, f, _) in figures if n == name):
            ours, others = figures[(name, figure, mine)], figures[(name, figure, theirs)]
            this, that = median(ours), median(others)
            rows.append(
                {
                    "benchmark": name,
                    "figure": figure,
                    "this checkout": round(this, 3),
                    theirs: round(that, 3),
                    "ratio": round(this / that, 3) if that else "-",
                    "runs": ", ".join(
                        f"{a:g}/{b:g}"
                        for a, b in zip(
                            figures[(name, figure, mine)],
                            figures[(name, figure, theirs)],
                            strict=True,
                        )
                    ),
                }
            )
    columns = ["benchmark", "figure", "this checkout", theirs, "ratio", "runs"]
    publish(
        "against",
        title=f"This checkout against {theirs}",
        intro=f"{args.rounds} rounds, each running every benchmark on both checkouts in turn "
        "(order flipped every round); medians, their ratio (this / other), and each round's "
        "pair (this/other). Ratios near 1 within the spread of the rounds are noise.",
        body=markdown_table(rows, columns),
        results={"other": theirs, "rows": rows},
    )


if __name__ == "__main__":
    main()
