"""Faults contained, through the API on the real tiny engine.

`FaultyRunner` injects each fault inside the real pipeline call: an exception, running out of
memory (for a call of too many images, or for an image that never fits), a hang until the
test releases it. Each test checks that only the requests the fault hit fail, with their
answer from the error table, that the server serves on, and that every request gets exactly
one answer (the metrics count each once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from tests.support.engines import FaultyRunner, hung_error
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

from .helpers import FAST, assert_openai_error, generate, http_client, metric_value, pixels

BATCH_OF_FOUR = ["--image-max-batch-size", "4", "--image-batch-delay-ms", "10000"]
"""A batch runs once four compatible requests are in: concurrent requests share one call."""


@pytest.fixture
def faulty(tiny_runner: DiffusersRunner) -> Iterator[FaultyRunner]:
    engine = FaultyRunner(tiny_runner)
    yield engine
    engine.release.set()  # never leave an engine thread hanging behind a test


async def metrics(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


def outcomes_grew(before: str, after: str) -> dict[str, float]:
    """How many requests each outcome counted between two /metrics answers (non-zero only)."""
    grew = {}
    for outcome in ("ok", "timeout", "out_of_memory", "error", "unavailable", "cancelled"):
        delta = metric_value(after, "vllm:image_requests_total", outcome=outcome) - metric_value(
            before, "vllm:image_requests_total", outcome=outcome
        )
        if delta:
            grew[outcome] = delta
    return grew


def splits(text: str) -> float:
    return metric_value(text, "vllm:image_batch_splits_total")


async def test_an_engine_exception_fails_only_the_request_that_causes_it(
    make_app, faulty: FaultyRunner, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app(faulty, ["--image-max-batch-size", "2", "--image-batch-delay-ms", "10000"])
    async with http_client(app) as client:
        before = await metrics(client)
        with caplog.at_level(logging.WARNING, logger="vllm_omni_images.engine"):
            failing, companion = await asyncio.gather(
                generate(client, **FAST, prompt=FaultyRunner.FAIL_PROMPT, seed=1),
                generate(client, **FAST, prompt="a companion in the same batch", seed=2),
            )
        error = assert_openai_error(failing, 500)
        assert error["type"] == "InternalServerError"
        assert FaultyRunner.FAILURE in error["message"]  # the cause
        assert companion.status_code == 200, companion.text  # retried alone
        assert (await client.get("/health")).status_code == 200
        after_alone = await generate(client, **FAST, n=2)  # the next batch: two images, at once
        assert after_alone.status_code == 200, after_alone.text
        after = await metrics(client)
    assert outcomes_grew(before, after) == {"error": 1, "ok": 2}
    assert (
        metric_value(after, "vllm:image_batch_isolations_total")
        - metric_value(before, "vllm:image_batch_isolations_total")
        == 1
    )
    # The batch, each request alone (the failing one once), the next batch.
    assert faulty.calls[0] in ([1, 2], [2, 1])
    assert sorted(faulty.calls[1:3]) == [[1], [2]]
    assert len(faulty.calls) == 4 and len(faulty.calls[3]) == 2
    assert any("retrying each request alone" in r.getMessage() for r in caplog.records)


async def test_out_of_memory_retries_in_halves_and_every_request_succeeds(
    make_app, faulty: FaultyRunner, caplog: pytest.LogCaptureFixture
) -> None:
    faulty.max_images = 2
    app = await make_app(faulty, BATCH_OF_FOUR)
    async with http_client(app) as client:
        before = await metrics(client)
        with caplog.at_level(logging.WARNING, logger="vllm_omni_images.engine"):
            responses = await asyncio.gather(
                *(generate(client, **FAST, seed=seed) for seed in range(4))
            )
        for response in responses:
            assert response.status_code == 200, response.text
            assert len(response.json()["data"]) == 1
        after = await metrics(client)
    assert [len(call) for call in faulty.calls] == [4, 2, 2]
    assert sorted(seed for call in faulty.calls[1:] for seed in call) == [0, 1, 2, 3]
    assert outcomes_grew(before, after) == {"ok": 4}  # out_of_memory counts what failed: none
    assert splits(after) - splits(before) == 1
    assert any("retrying it as 2 + 2 images" in r.getMessage() for r in caplog.records)


async def test_a_requests_images_split_across_calls_are_its_own_images(
    make_app, faulty: FaultyRunner
) -> None:
    app = await make_app(faulty, ["--image-max-batch-size", "4"])
    body = {**FAST, "n": 4, "seed": 7}
    async with http_client(app) as client:
        whole = await generate(client, **body)
        faulty.max_images = 1  # from now on every image runs alone, after the splits
        split = await generate(client, **body)
    assert whole.status_code == 200 and split.status_code == 200, split.text
    assert [len(call) for call in faulty.calls] == [4, 4, 2, 1, 1, 2, 1, 1]
    for alone, batched in zip(split.json()["data"], whole.json()["data"], strict=True):
        # Image i depends on seed + i alone; batched matrix products round differently.
        difference = np.abs(
            pixels(alone["b64_json"]).astype(np.int16) - pixels(batched["b64_json"])
        ).max()
        assert difference <= 1


async def test_an_image_that_never_fits_fails_alone_and_the_others_succeed(
    make_app, faulty: FaultyRunner
) -> None:
    app = await make_app(faulty, BATCH_OF_FOUR)
    async with http_client(app) as client:
        before = await metrics(client)
        prompts = ["a red fox", FaultyRunner.OOM_PROMPT, "a blue fox", "a green fox"]
        responses = await asyncio.gather(*(generate(client, **FAST, prompt=p) for p in prompts))
        by_prompt = dict(zip(prompts, responses, strict=True))
        error = assert_openai_error(by_prompt.pop(FaultyRunner.OOM_PROMPT), 503)
        assert error["type"] == "ServiceUnavailableError"
        assert "out of GPU memory" in error["message"]
        assert "64x64 image did not fit, even alone" in error["message"]
        for response in by_prompt.values():
            assert response.status_code == 200, response.text
        assert (await client.get("/health")).status_code == 200
        after = await metrics(client)
    assert outcomes_grew(before, after) == {"ok": 3, "out_of_memory": 1}
    # 4 -> 2 + 2; the half with the image that never fits -> 1 + 1.
    assert [len(call) for call in faulty.calls[:2]] == [4, 2]
    assert sorted(len(call) for call in faulty.calls) == [1, 1, 2, 2, 4]


async def test_a_hung_engine_fails_fast_until_its_call_returns(
    make_app, faulty: FaultyRunner, caplog: pytest.LogCaptureFixture
) -> None:
    # A request may take 4 s; a call still running 2 s after that is taken as hung. A request
    # that arrives as the stuck one times out (at 4 s) is still waiting then (its own deadline
    # is at 8 s): both margins are 2 s.
    app: FastAPI = await make_app(
        faulty, ["--image-request-timeout", "4", "--image-engine-hang-grace", "2"]
    )
    engine_client = app.state.engine_client
    caplog.set_level(logging.WARNING, logger="vllm_omni_images.engine")
    async with http_client(app) as client:
        before = await metrics(client)
        stuck = asyncio.create_task(generate(client, **FAST, prompt=FaultyRunner.HANG_PROMPT))
        assert await asyncio.to_thread(faulty.hanging.wait, ENGINE_WAIT_S)
        assert_openai_error(await stuck, 504)  # its own timeout, as always
        assert hung_error(engine_client.engine) is None  # asked to stop: it has the grace period

        # A request that arrives now waits behind the stuck call, with time left on its clock;
        # once the engine is taken as hung it fails at once instead of waiting that out.
        waiting = asyncio.create_task(generate(client, **FAST))
        await until(lambda: engine_client.queued_images == 1, "queued", timeout_s=ENGINE_WAIT_S)
        error = assert_openai_error(await waiting, 503)
        assert "not responding" in error["message"]
        assert hung_error(engine_client.engine) is not None

        assert (await client.get("/health")).status_code == 503
        refused = assert_openai_error(await generate(client, **FAST), 503)
        assert refused["type"] == "ServiceUnavailableError"
        assert "not responding" in refused["message"]
        assert metric_value(await metrics(client), "vllm:image_engine_hung") == 1

        faulty.release.set()  # the call returns (and stops: no one waits for it)
        await until(
            lambda: hung_error(engine_client.engine) is None, "recovery", timeout_s=ENGINE_WAIT_S
        )
        assert (await client.get("/health")).status_code == 200
        assert (await generate(client, **FAST)).status_code == 200
        after = await metrics(client)
    # Every request answered once: 504, 503 (waiting), 503 (refused), 200.
    assert outcomes_grew(before, after) == {"timeout": 1, "unavailable": 2, "ok": 1}
    assert metric_value(after, "vllm:image_engine_hung") == 0
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(level == logging.ERROR and "taken as hung" in m for level, m in messages)
    assert any("serves again" in m for _, m in messages)
