"""The pixel budget (`--image-max-pixels-in-flight`) through the API, on the real tiny engine at
small sizes: a request over it is a 400 before it is queued, naming what fits; concurrent
requests queue rather than run over it, and every one gets its images."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.engines import ObservedRunner
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

from .helpers import FAST, assert_openai_error, generate, http_client, metric_value

BUDGET = ["--image-max-pixels-in-flight", "3x64x64", "--image-max-batch-size", "8"]
"""Room for three of `FAST`'s 64x64 images at once, below the batch size."""


@pytest.fixture
def engine(tiny_runner: DiffusersRunner) -> ObservedRunner:
    return ObservedRunner(tiny_runner)


async def test_a_request_over_the_budget_is_a_400_naming_what_fits(
    make_app, engine: ObservedRunner
) -> None:
    app = await make_app(engine, BUDGET)
    async with http_client(app) as client:
        # The counter is the process's (other tests' refusals count too): compare before/after.
        before = (await client.get("/metrics")).text
        invalid = metric_value(before, "vllm:image_requests_total", outcome="invalid")
        too_many = await generate(client, **FAST, n=4)
        error = assert_openai_error(too_many, 400, param="n")
        assert error["type"] == "BadRequestError"
        assert "4 images of 64x64 are 16384 pixels" in error["message"]
        assert "--image-max-pixels-in-flight" in error["message"]
        assert "What fits: n=3 at 64x64 or n=4 at up to 48x48." in error["message"]

        too_large = await generate(client, size="128x128", num_inference_steps=2)
        error = assert_openai_error(too_large, 400, param="size")
        assert "What fits: a size of up to 96x96." in error["message"]

        streamed = await generate(client, size="128x128", num_inference_steps=2, stream=True)
        assert_openai_error(streamed, 400, param="size")  # refused before the stream starts

        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "vllm:image_requests_total", outcome="invalid") == invalid + 3
    assert engine.batches == []  # none of them reached the engine


async def test_concurrent_requests_queue_within_the_budget(
    make_app, engine: ObservedRunner
) -> None:
    app = await make_app(engine, BUDGET)
    engine.gate.clear()  # the first batch waits, so that the rest queue up behind it
    async with http_client(app) as client:
        first = asyncio.create_task(generate(client, **FAST, n=3, seed=0))
        await asyncio.to_thread(engine.started.wait, ENGINE_WAIT_S)
        rest = [asyncio.create_task(generate(client, **FAST, n=2, seed=s)) for s in (10, 20, 30)]
        engine_client = app.state.engine_client
        await until(
            lambda: engine_client.queued_images == 6, "six images queued", timeout_s=ENGINE_WAIT_S
        )
        engine.gate.set()
        responses = await asyncio.gather(first, *rest)
    assert [r.status_code for r in responses] == [200] * 4
    assert [len(r.json()["data"]) for r in responses] == [3, 2, 2, 2]
    # Batch size 8 would have run the three waiting requests together: the budget runs them
    # as pixels allow, one 2-image request at a time (two do not fit in three images' room).
    assert engine.batches == [3, 2, 2, 2]
