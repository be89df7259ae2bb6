"""What every benchmark shares around its measurement: the common command-line arguments, the
statistics, and the report: the machine and command that produced a result, written as
`docs/benchmarks/<name>.json` and `<name>.md`.

Imports neither httpx nor vLLM (torch only when the machine is described), so the engine
benchmark runs where only torch, transformers and diffusers are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
SHARED_NOTE = (
    "The machine was shared with other work (tests, experiments) during the run, so timings "
    "are noisy: compare the ratios, measured alternately, rather than the figures."
)


def benchmark_parser(
    doc: str | None, *, model: bool = True, size: str | None = None, steps: int | None = None
) -> argparse.ArgumentParser:
    """A parser described by the first line of `doc` (the module's docstring), with the
    arguments most benchmarks share: `--model` (a served model name), and `--size` and
    `--steps` where a default is given."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    if model:
        parser.add_argument("--model", default="tiny-qwen-image")
    if size is not None:
        parser.add_argument("--size", default=size)
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps)
    return parser


def publish(
    name: str,
    *,
    title: str,
    intro: str,
    body: str,
    results: dict[str, Any],
    module: str | None = None,
) -> Path:
    """Write `docs/benchmarks/<name>.json` and `<name>.md`, print the markdown and its path, and
    return the path.

    The markdown is `# <title>`, then a paragraph that starts with how the result was produced
    (`run_description` of `module`, by default `benchmarks.<name>`) and goes on with `intro`,
    then `body` (tables and verdicts). The JSON is `results` after a `machine` entry."""
    info = machine()
    description = run_description(module or f"benchmarks.{name}", info)
    markdown = f"# {title}\n\n{description} {intro}\n\n{body}"
    path = write_results(name, {"machine": info, **results}, markdown)
    print(markdown)
    print(f"wrote {path}")
    return path


def machine() -> dict[str, Any]:
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


def checkout() -> str:
    """The commit, and the tracked files changed since: what a run from a work tree ran."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit, changed = (
            subprocess.run(
                ["git", *args], capture_output=True, text=True, check=True, cwd=root
            ).stdout.strip()
            for args in (["rev-parse", "--short", "HEAD"], ["diff", "--name-only", "HEAD"])
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not changed:
        return commit
    return f"{commit} + uncommitted changes to {', '.join(changed.split())}"


def machine_load(before: float) -> str:
    """The 1-minute load average at the start and now: how busy the machine was."""
    return (
        f"load average {before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores"
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


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (the value at or below which `fraction` of samples lie)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]
