"""Schemathesis against the live server's own OpenAPI schema: every image route, cases that fit
its schema and cases that break it; no 5xx, and every error in OpenAI's shape. A bounded run;
`python -m benchmarks.fuzz` runs the same with many more cases (docs/reliability.md)."""

from __future__ import annotations

import pytest

from testing.fuzzing import fuzz

from .live_server import AUTH

pytestmark = pytest.mark.e2e

CASES_PER_MODE = 15


def test_fuzzing_every_image_route_finds_no_5xx_and_only_openai_errors(server: str) -> None:
    report = fuzz(server, headers=AUTH, max_examples=CASES_PER_MODE)
    operations = {label.rsplit(" ", 1)[0] for label in report.cases}
    assert operations >= {
        "POST /v1/images/generations",
        "POST /v1/images/edits",
        "POST /v1/images/variations",
        "GET /images/files/{name}",
        "HEAD /images/files/{name}",
    }, operations
    assert not report.failures, "\n".join(report.failures[:10])
    statuses = {label.rsplit(" ", 1)[1] for label in report.statuses}
    assert "200" in statuses and any(status.startswith("4") for status in statuses), statuses
