"""Fuzz every image route of a live `vllm serve` from its own OpenAPI schema (schemathesis):
the larger run of what `tests/e2e/test_fuzz_api.py` does in `make test`.

    .venv/bin/python -m benchmarks.fuzz                   # writes docs/benchmarks/fuzz.md
    .venv/bin/python -m benchmarks.fuzz --cases 50        # a quick look

Each route gets `--cases` cases that fit its schema and as many that break it; an answer fails
when it is a 5xx, or not what an OpenAI client can read (`testing/fuzzing.py`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.report import benchmark_parser, publish
from testing.fuzzing import fuzz
from testing.server_process import free_port, running_server, vllm_serve_command

API_KEY = "fuzz-key"


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--cases", type=int, default=300, help="per route and mode")
    args = parser.parse_args()
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="fuzz-")) / "serve.log"
    command = vllm_serve_command(args.model, port, "--api-key", API_KEY)
    with running_server(command, port, log) as base_url:
        start = time.perf_counter()
        report = fuzz(base_url, {"Authorization": f"Bearer {API_KEY}"}, max_examples=args.cases)
        wall_s = time.perf_counter() - start
    summary = {**report.summary(), "wall_s": round(wall_s, 1)}
    failures = report.failures[:30]
    publish(
        "fuzz",
        title="Fuzzing the Images API from its OpenAPI schema",
        intro=(
            f"`vllm serve {args.model} --task image --api-key ...`; schemathesis "
            f"{args.cases} positive and {args.cases} negative cases per image route (fewer where "
            "a route's schema allows fewer distinct cases)."
        ),
        body="```json\n"
        + json.dumps(summary, indent=2)
        + "\n```\n\n**Failures** (first 30)\n\n"
        + ("\n".join(f"- {failure}" for failure in failures) if failures else "none")
        + "\n",
        results={"summary": summary, "failures": failures},
    )


if __name__ == "__main__":
    main()
