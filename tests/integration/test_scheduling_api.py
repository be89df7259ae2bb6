"""Batching, backpressure, timeouts, cancellation and metrics through the API, on the real
tiny engine. The engine wrappers only hold a batch back or count steps; the images are real."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import FastAPI

from tests.support.engines import ObservedRunner, refuses_new_work
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.images.app_state import images_state
from vllm_omni_images.images.protocol import ImageGenerationRequest
from vllm_omni_images.images.serving import OpenAIServingImage

from .helpers import FAST, assert_openai_error, generate, http_client, metric_value


def serving_of(app: FastAPI) -> OpenAIServingImage:
    images = images_state(app.state)
    assert images is not None and images.serving is not None
    return images.serving


async def one_running_one_queued(
    client: httpx.AsyncClient, app, engine: ObservedRunner, queued_n: int = 1
) -> tuple[asyncio.Task[httpx.Response], asyncio.Task[httpx.Response]]:
    """Hold a first request in the engine (the gate is closed) and queue a second behind it."""
    engine.gate.clear()
    running = asyncio.create_task(generate(client, **FAST))
    await asyncio.to_thread(engine.started.wait, ENGINE_WAIT_S)
    queued = asyncio.create_task(generate(client, **FAST, n=queued_n))
    engine_client = app.state.engine_client
    await until(
        lambda: (engine_client.running_images, engine_client.queued_images) == (1, queued_n),
        "one running, the rest queued",
        timeout_s=ENGINE_WAIT_S,
    )
    return running, queued


@pytest.fixture
def engine(tiny_runner: DiffusersRunner) -> ObservedRunner:
    return ObservedRunner(tiny_runner)


async def test_concurrent_requests_share_batches(make_app, engine: ObservedRunner) -> None:
    app = await make_app(engine, ["--image-max-batch-size", "4", "--image-batch-delay-ms", "50"])
    engine.gate.clear()  # the first batch waits, so the rest queue up behind it
    async with http_client(app) as client:
        first = asyncio.create_task(generate(client, **FAST, seed=0))
        await asyncio.to_thread(engine.started.wait, ENGINE_WAIT_S)
        rest = [asyncio.create_task(generate(client, **FAST, seed=s)) for s in range(1, 9)]
        engine_client = app.state.engine_client
        await until(
            lambda: (engine_client.running_images, engine_client.queued_images) == (1, 8),
            "one running, eight queued",
            timeout_s=ENGINE_WAIT_S,
        )
        engine.gate.set()
        responses = await asyncio.gather(first, *rest)
    assert [r.status_code for r in responses] == [200] * 9
    assert engine.batches == [1, 4, 4]


async def test_a_full_queue_answers_429_with_retry_after(make_app, engine: ObservedRunner) -> None:
    app = await make_app(engine, ["--image-max-batch-size", "1", "--image-max-queue", "2"])
    async with http_client(app) as client:
        running, queued = await one_running_one_queued(client, app, engine, queued_n=2)

        refused = await generate(client, **FAST)
        error = assert_openai_error(refused, 429)
        assert error["type"] == "RateLimitError"
        assert int(refused.headers["Retry-After"]) >= 1

        too_many = await generate(client, **FAST, n=3)
        assert "--image-max-queue" in assert_openai_error(too_many, 400, "n")["message"]

        engine.gate.set()
        assert (await running).status_code == 200
        assert len((await queued).json()["data"]) == 2
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "vllm:image_requests_total", outcome="rejected") >= 1


async def test_a_request_past_its_timeout_gets_504_and_its_work_stops(
    make_app, engine: ObservedRunner
) -> None:
    # Room for the quick request below on two loaded cores (it took up to 1.2 s there).
    app = await make_app(engine, ["--image-request-timeout", "3"])
    async with http_client(app) as client:
        # 200 steps at 1024x1024 take far longer than 3 s on any machine this runs on (on two
        # CPU cores, ~20 ms a step and 3 s for the decode).
        slow = await generate(client, size="1024x1024", num_inference_steps=200)
        error = assert_openai_error(slow, 504)
        assert error["type"] == "TimeoutError"
        assert "3 s" in error["message"]
        assert engine.steps < 200, "the timed-out batch ran to the end"
        # The engine is free again at once.
        assert (await generate(client, **FAST)).status_code == 200


async def test_a_client_that_goes_away_frees_its_place(make_app, engine: ObservedRunner) -> None:
    app = await make_app(engine, ["--image-max-batch-size", "1"])
    serving = serving_of(app)
    engine_client = app.state.engine_client
    request = ImageGenerationRequest(prompt="a red fox", size="256x256", num_inference_steps=200)

    # Gone while running: the engine stops at the next denoising step.
    running = asyncio.create_task(serving.create_image(request))
    await until(lambda: engine.steps > 0, "running", timeout_s=ENGINE_WAIT_S)
    # Gone while queued: dropped from the queue, never run.
    queued = asyncio.create_task(serving.create_image(request))
    await until(
        lambda: (engine_client.running_images, engine_client.queued_images) == (1, 1),
        "one running, one queued",
        timeout_s=ENGINE_WAIT_S,
    )
    queued.cancel()
    running.cancel()
    await asyncio.gather(running, queued, return_exceptions=True)
    await until(lambda: engine_client.running_images == 0, "engine free", timeout_s=ENGINE_WAIT_S)
    assert engine_client.queued_images == 0
    assert engine.batches == [1]
    assert engine.steps < 200

    async with http_client(app) as client:
        assert (await generate(client, **FAST)).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "vllm:image_requests_total", outcome="cancelled") >= 2


async def test_the_running_images_gauge_counts_every_running_request(
    make_app, engine: ObservedRunner
) -> None:
    app = await make_app(
        engine,
        ["--served-model-name", "gauge-model", "--image-max-batch-size", "4",
         "--image-batch-delay-ms", "200"],
    )  # fmt: skip
    engine_client = app.state.engine_client
    labels = {"model_name": "gauge-model"}
    engine.gate.clear()
    async with http_client(app) as client:
        one = asyncio.create_task(generate(client, **FAST, seed=1))
        two = asyncio.create_task(generate(client, **FAST, seed=2, n=2))
        await until(lambda: engine_client.running_images == 3, "both running in one batch")
        metrics = (await client.get("/metrics")).text
        running = metric_value(metrics, "vllm:image_running_images", **labels)
        engine.gate.set()
        assert [(await task).status_code for task in (one, two)] == [200, 200]
        idle = metric_value(
            (await client.get("/metrics")).text, "vllm:image_running_images", **labels
        )
    assert engine.batches == [3]
    assert (running, idle) == (3, 0)


async def test_vllm_load_gauges_count_image_requests_as_they_queue_and_run(
    make_app, engine: ObservedRunner
) -> None:
    """`vllm:num_requests_running` / `_waiting`, as vLLM's routers and autoscalers read them:
    requests, not images; back to 0 when all are answered or gone."""
    app = await make_app(engine, ["--served-model-name", "load-model"])
    engine_client = app.state.engine_client
    labels = {"model_name": "load-model", "engine": "0"}

    async def gauges(client: httpx.AsyncClient) -> tuple[float, float]:
        text = (await client.get("/metrics")).text
        return (
            metric_value(text, "vllm:num_requests_running", **labels),
            metric_value(text, "vllm:num_requests_waiting", **labels),
        )

    async with http_client(app) as client:
        assert await gauges(client) == (0, 0)
        running, queued = await one_running_one_queued(client, app, engine, queued_n=2)
        third = asyncio.create_task(generate(client, **FAST, seed=7))
        # One whose caller goes away while it waits (as a dropped connection does).
        request = ImageGenerationRequest.model_validate({"prompt": "a red fox", **FAST})
        gone = asyncio.create_task(serving_of(app).create_image(request))
        await until(lambda: engine_client.waiting_requests == 3, "three requests waiting")
        busy = await gauges(client)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        after_cancel = await gauges(client)
        engine.gate.set()
        answered = await asyncio.gather(running, queued, third)
        idle = await gauges(client)
    assert busy == (1, 3)  # requests, not images: the queued n=2 counts once
    assert after_cancel == (1, 2)
    assert [r.status_code for r in answered] == [200] * 3
    assert idle == (0, 0)


async def test_metrics_and_the_request_log_line(
    make_app, engine: ObservedRunner, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app(engine, ["--served-model-name", "metrics-model"])
    labels = {"model_name": "metrics-model"}
    async with http_client(app) as client:
        before = (await client.get("/metrics")).text
        with caplog.at_level(logging.INFO, logger="vllm_omni_images.images.serving"):
            response = await client.post(
                "/v1/images/generations",
                json={"prompt": "a red fox", "n": 2, **FAST},
                headers={"X-Request-Id": "req-metrics-1"},
            )
        assert response.status_code == 200
        after = (await client.get("/metrics")).text

    def grew(name: str, **extra: str) -> float:
        return metric_value(after, name, **labels, **extra) - metric_value(
            before, name, **labels, **extra
        )

    assert grew("vllm:image_requests_total", outcome="ok") == 1
    assert grew("vllm:image_images_generated_total") == 2
    assert grew("vllm:image_batch_size_count") == 1
    assert grew("vllm:image_batch_size_sum") == 2
    assert grew("vllm:image_queue_wait_seconds_count") == 1
    assert grew("vllm:image_engine_seconds_count") == 1
    assert grew("vllm:image_encode_seconds_count") == 1
    assert grew("vllm:image_denoise_step_seconds_count") == 2
    assert metric_value(after, "vllm:image_queue_images", **labels) == 0

    [line] = [r.getMessage() for r in caplog.records if "req-metrics-1" in r.getMessage()]
    for fragment in ("ok", "64x64", "n=2", "steps=2", "queue=", "engine=", "encode="):
        assert fragment in line


async def test_concurrent_mixed_requests_all_get_their_own_images(make_app, tiny_runner) -> None:
    app = await make_app(tiny_runner)
    sizes = ["64x64", "128x64", "64x128"]
    async with http_client(app) as client:

        async def one(index: int) -> tuple[int, httpx.Response]:
            size = sizes[index % len(sizes)]
            n = 1 + index % 2
            return index, await generate(client, **{**FAST, "size": size, "n": n})

        results = await asyncio.gather(*(one(i) for i in range(12)))
    for index, response in results:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["size"] == sizes[index % len(sizes)]
        assert len(body["data"]) == 1 + index % 2


async def test_shutdown_answers_every_accepted_request(make_app, engine: ObservedRunner) -> None:
    app = await make_app(engine, ["--image-max-batch-size", "1"])
    engine_client = app.state.engine_client
    async with http_client(app) as client:
        running, queued = await one_running_one_queued(client, app, engine)

        # As vLLM does on SIGTERM: the synchronous hook, from a worker thread.
        shutdown = asyncio.create_task(asyncio.to_thread(engine_client.shutdown, 0))
        refused = await queued
        assert "shutting down" in assert_openai_error(refused, 503)["message"]
        engine.gate.set()
        assert (await running).status_code == 200  # the running batch finishes first
        await shutdown
        assert (await client.get("/health")).status_code == 503
        assert_openai_error(await generate(client, **FAST), 503)


async def test_a_draining_shutdown_finishes_accepted_work_and_takes_no_new(
    make_app, engine: ObservedRunner
) -> None:
    app = await make_app(engine, ["--image-max-batch-size", "1"])
    engine_client = app.state.engine_client
    async with http_client(app) as client:
        running, queued = await one_running_one_queued(client, app, engine)

        shutdown = asyncio.create_task(asyncio.to_thread(engine_client.shutdown, 30))
        await until(lambda: refuses_new_work(engine_client), "draining", timeout_s=ENGINE_WAIT_S)
        late = await generate(client, **FAST)
        assert "shutting down" in assert_openai_error(late, 503)["message"]
        engine.gate.set()
        assert (await running).status_code == 200
        assert (await queued).status_code == 200  # drained, not dropped
        await shutdown
