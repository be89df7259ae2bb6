"""Fuzz the Images API of a running server from its own OpenAPI schema, with schemathesis.

Shared by the end-to-end test (a bounded number of cases in `make test`) and the fuzz benchmark
(a larger run whose figures go to docs/reliability.md). Each image route of the served
`/openapi.json` gets cases that fit its schema (positive) and cases that break it (negative).
An answer passes when it is not a 5xx and is what a client of the OpenAI API can read: a 200
with images (JSON, or server-sent events when it asked to stream), or a 4xx in OpenAI's error
shape (vLLM's own 401 for a missing key aside, which the fuzzer never triggers: it sends the key);
to `HEAD`, the same without a body.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode

IMAGE_ROUTES = ("/v1/images/", "/images/files/")


@dataclass
class FuzzReport:
    cases: Counter[str] = field(default_factory=Counter)
    """Cases sent, by `METHOD path mode`."""
    statuses: Counter[str] = field(default_factory=Counter)
    """Answers, by `METHOD path status`."""
    failures: list[str] = field(default_factory=list)
    no_cases: list[str] = field(default_factory=list)
    """`METHOD path mode` where the schema admits no such case (nothing to break in a path
    parameter that is any string)."""

    def summary(self) -> dict[str, Any]:
        return {
            "cases": sum(self.cases.values()),
            "by_operation": dict(sorted(self.cases.items())),
            "statuses": dict(sorted(self.statuses.items())),
            "failures": len(self.failures),
            "no_cases_possible": self.no_cases,
        }


def problem(status: int, content_type: str, text: str, method: str = "GET") -> str | None:
    """What is wrong with an answer, or None. A `HEAD` answer is a `GET` one without its body."""
    if status >= 500:
        return f"{status}: {text[:300]}"
    if method == "HEAD":
        if text:
            return f"{status}: HEAD answered a body: {text[:300]}"
        expected = "image/" if status == 200 else "application/json"
        return None if content_type.startswith(expected) else f"{status}: HEAD as {content_type}"
    if status == 200 and content_type.startswith("image/"):
        return None
    if status == 200 and content_type.startswith("text/event-stream"):
        return None if "event: error" not in text else f"error event: {text[:300]}"
    try:
        body = json.loads(text)
    except ValueError:
        return f"{status}: not JSON: {text[:300]}"
    if status == 200:
        return None if isinstance(body.get("data"), list) and body["data"] else f"200: {text[:300]}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        return f"{status}: not OpenAI's error shape: {text[:300]}"
    if error["code"] != status:
        return f"{status}: code {error['code']}"
    return None


def fuzz(
    base_url: str,
    headers: dict[str, str] | None = None,
    max_examples: int = 25,
    timeout_s: float = 300.0,
) -> FuzzReport:
    """Send `max_examples` positive and as many negative cases to every image route."""
    report = FuzzReport()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    # A route whose schema schemathesis cannot read (an `Err`) is left out: the callers check
    # that every image route was fuzzed.
    operations = [
        result.ok()
        for result in schema.get_all_operations()
        if isinstance(result, Ok) and result.ok().path.startswith(IMAGE_ROUTES)
    ]
    if not operations:
        raise RuntimeError(f"no image routes in {base_url}/openapi.json")
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not len(operation.body):
                # Only a path parameter that is any string: nothing breaks its schema.
                report.no_cases.append(f"{operation.method.upper()} {operation.path} {mode}")
                continue
            _fuzz_operation(operation, mode, base_url, headers, max_examples, timeout_s, report)
    return report


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    headers: dict[str, str] | None,
    max_examples: int,
    timeout_s: float,
    report: FuzzReport,
) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        report.cases[f"{label} {mode.value}"] += 1
        response = case.call(base_url=base_url, headers=headers, timeout=timeout_s)
        report.statuses[f"{label} {response.status_code}"] += 1
        content_type = response.headers.get("content-type") or ""
        if isinstance(content_type, list):  # schemathesis keeps each header as a list
            content_type = content_type[0] if content_type else ""
        found = problem(response.status_code, content_type, response.text, case.method.upper())
        if found is not None:
            body = case.body if isinstance(case.body, dict | list | str) else "<binary>"
            report.failures.append(f"{label} ({mode.value}) {str(body)[:200]} -> {found}")

    try:
        run()
    except Unsatisfiable:
        report.no_cases.append(f"{label} {mode.value}")
