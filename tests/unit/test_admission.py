"""Admission (`ImageEngineClient`), in front of any engine: the queue limit (429 with a
Retry-After guess), requests too large ever to fit, timeouts, withdrawal, close, the counts
of queued and running images, and what the metrics observer sees.

Most tests put it in front of the batching engine over a `FakeRunner`, as the server does for
a diffusers pipeline; those about an engine that queues and batches by itself (as vllm-omni's)
use `ScriptedEngine`, whose requests the test starts and finishes by hand."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from PIL import Image

from tests.support.batching import FLAG_DEFAULTS, RecordingObserver, assert_images_of, serving
from tests.support.engines import (
    FakeClock,
    FakeRunner,
    ScriptedEngine,
    colour,
    images_of,
    refuses_new_work,
    req,
)
from tests.support.waiting import WAIT_S, until
from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineNotReadyError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


def submit(client: ImageEngineClient, request: EngineRequest) -> asyncio.Task[list[Image.Image]]:
    return asyncio.create_task(images_of(client.generate(request)))


@pytest.mark.parametrize("fields", [{"max_queue_images": 0}, {"request_timeout_s": 0.0}])
def test_config_rejects_invalid_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(FLAG_DEFAULTS.admission_config(), **fields)


def test_a_request_without_seeds_cannot_be_made() -> None:
    """No engine or admission sees a request of no images: `EngineRequest` refuses it."""
    with pytest.raises(ValueError, match="at least one seed"):
        EngineRequest(prompt="a red fox", seeds=(), width=64, height=64, num_inference_steps=2)


# The queue limit


async def test_queue_limit_refuses_and_cancelled_requests_free_their_place(
    runner: FakeRunner,
) -> None:
    async with serving(runner, max_queue_images=4) as served:
        held = await served.hold(req(100, 101, 102, 103))
        first, second = await served.submit_queued(req(1, 2), req(3))
        assert served.client.queued_images == 3
        with pytest.raises(QueueFullError) as refused:
            served.client.check_admission(req(1, 2))  # asked before any work, as the server asks
        assert refused.value.retry_after_s >= 1.0  # the Retry-After of the 429
        with pytest.raises(QueueFullError) as refused:
            await images_of(served.client.generate(req(4, 5, request_id="refused")))
        assert refused.value.retry_after_s >= 1.0
        assert served.client.queued_images == 3  # a refused request is never counted

        first.cancel()
        await until(lambda: served.client.queued_images == 1, "the cancelled images to leave")
        [third] = await served.submit_queued(req(4, 5))
        runner.gate.set()
        await asyncio.gather(held, second, third)
        with pytest.raises(asyncio.CancelledError):
            await first
    assert all(req(1, 2) not in batch for batch in runner.batches)
    # The refused request never ran: only its resubmission did.
    assert sum(batch.count(req(4, 5)) for batch in runner.batches) == 1


async def test_a_request_larger_than_the_whole_queue_is_refused_at_once(
    runner: FakeRunner,
) -> None:
    too_large = req(*range(10, 15))
    async with serving(runner, max_queue_images=4) as served:
        # Refused on an idle server too: it could never fit, however long it waited.
        with pytest.raises(RequestTooLargeError) as refused:
            await images_of(served.client.generate(too_large))
        assert (refused.value.num_images, refused.value.max_queue_images) == (5, 4)
        assert served.client.queued_images == 0

        held = await served.hold(req(100, 101, 102, 103))
        [queued] = await served.submit_queued(req(1, 2, 3))
        with pytest.raises(QueueFullError):
            await images_of(served.client.generate(req(4, 5)))  # fits the queue, just not now
        with pytest.raises(RequestTooLargeError):
            await images_of(served.client.generate(too_large))
        runner.gate.set()
        await asyncio.gather(held, queued)
    assert runner.batches == [[req(100, 101, 102, 103)], [req(1, 2, 3)]]


# Timeouts and withdrawal


async def test_timeout_while_queued(runner: FakeRunner) -> None:
    async with serving(runner, request_timeout_s=0.05) as served:
        runner.gate.clear()
        held = served.submit(req(100, width=128))
        await until(lambda: len(runner.batches) == 1, "the first call to start")
        with pytest.raises(RequestTimeoutError):
            await images_of(served.client.generate(req(1)))
        assert served.client.queued_images == 0
        with pytest.raises(RequestTimeoutError):
            await held
        # The timed-out request left the engine's queue too: it never runs, alone or with
        # a compatible request that comes after it.
        runner.gate.set()
        assert_images_of(req(2), await images_of(served.client.generate(req(2))))
    assert runner.batches == [[req(100, width=128)], [req(2)]]


async def test_timeout_while_running_stops_the_batch(runner: FakeRunner) -> None:
    observer = RecordingObserver()
    async with serving(runner, observer=observer, request_timeout_s=0.05) as served:
        runner.gate.clear()
        with pytest.raises(RequestTimeoutError):
            await images_of(served.client.generate(req(1, request_id="slow")))
        runner.gate.set()
        await until(lambda: observer.of("end") != [], "the batch to end")
    assert runner.finished == ["cancelled"]
    assert runner.steps_run == [1]
    assert observer.of("start") == [1]
    assert len(observer.of("end")) == 1
    assert (served.client.queued_images, served.client.running_images) == (0, 0)


async def test_cancel_while_queued_removes_the_request(runner: FakeRunner) -> None:
    async with serving(runner) as served:
        held = await served.hold(req(100, width=128))
        [queued] = await served.submit_queued(req(1))
        queued.cancel()
        await until(lambda: served.client.queued_images == 0, "the cancelled request to leave")
        runner.gate.set()
        assert_images_of(req(100), await held)
    assert runner.batches == [[req(100, width=128)]]


# Close


async def test_close_fails_the_waiting_and_waits_for_the_started(runner: FakeRunner) -> None:
    async with serving(runner) as served:
        started = await served.hold(req(1))
        [waiting] = await served.submit_queued(req(2, width=128))
        await until(lambda: served.client.running_images == 1, "the first to start")
        closing = asyncio.create_task(served.client.close())
        with pytest.raises(EngineClosedError):
            await waiting
        assert not closing.done() and served.client.queued_images == 0
        with pytest.raises(EngineClosedError):
            served.client.check_admission(req(1))
        runner.gate.set()
        assert len(await started) == 1
        await asyncio.wait_for(closing, WAIT_S)
        assert runner.closed and not served.client.is_running
        with pytest.raises(EngineNotReadyError):  # the model is released
            await images_of(served.client.generate(req(3)))
    assert runner.batches == [[req(1)]]  # the waiting request never ran


# The observer


async def test_observer_sees_queue_waits_steps_and_batches() -> None:
    clock = FakeClock()
    runner = FakeRunner(steps=3, clock=clock)
    # The second batch waits at its start (the clock at 13) until the test lets it go, so
    # that admission sees it start before its steps move the clock.
    release = threading.Event()

    def wait_for_release(requests: Sequence[EngineRequest]) -> None:
        if requests[0].request_id == "queued":
            assert release.wait(WAIT_S), "the test never let the second batch go"

    runner.fault = wait_for_release
    observer = RecordingObserver()
    async with serving(runner, clock=clock, observer=observer) as served:
        held = await served.hold(req(100, width=128, request_id="blocker"))
        [queued] = await served.submit_queued(req(1, 2, request_id="queued"))
        clock.now = 10.0
        runner.gate.set()
        await until(lambda: served.client.running_images == 2, "the second batch to start")
        release.set()
        await asyncio.gather(held, queued)
    assert observer.of("wait") == [0.0, 13.0]
    assert observer.of("start") == [1, 2]
    assert observer.of("step") == [11.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert observer.of("end") == [13.0, 3.0]
    assert observer.of("depth") == [1, 0, 2, 0]
    assert observer.of("running") == [1, 0, 2, 0]


# An engine that queues and batches by itself


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ImageEngineClient, ScriptedEngine]]:
    engine = ScriptedEngine()
    config = dataclasses.replace(FLAG_DEFAULTS.admission_config(), max_queue_images=4)
    client = ImageEngineClient(engine, "test-model", config)
    yield client, engine
    await client.close()


async def test_a_request_is_handed_over_at_once_and_counts_as_queued_until_it_starts(
    scripted: tuple[ImageEngineClient, ScriptedEngine],
) -> None:
    client, engine = scripted
    task = submit(client, req(1, 2, 3))
    await until(lambda: len(engine.requests) == 1, "the hand-over")
    assert (client.queued_images, client.running_images) == (3, 0)
    engine.requests[0].start(2)  # vllm-omni may start a request's images in different batches
    await until(lambda: client.running_images == 2, "two started images")
    assert client.queued_images == 1
    engine.requests[0].start(1)
    await until(lambda: client.queued_images == 0, "the last image to start")
    assert client.running_images == 3
    engine.requests[0].finish()
    assert [image.getpixel((0, 0)) for image in await task] == [colour(s) for s in (1, 2, 3)]
    assert client.running_images == 0


async def test_admission_counts_the_images_waiting_in_the_engine(
    scripted: tuple[ImageEngineClient, ScriptedEngine],
) -> None:
    client, engine = scripted
    waiting = submit(client, req(1, 2, 3))
    await until(lambda: len(engine.requests) == 1, "the hand-over")
    with pytest.raises(QueueFullError):
        await images_of(client.generate(req(4, 5)))
    assert len(engine.requests) == 1  # a refused request never reaches the engine
    engine.requests[0].start(3)
    await until(lambda: client.queued_images == 0, "the images to start")
    second = submit(client, req(4, 5))
    await until(lambda: len(engine.requests) == 2, "the second hand-over")
    for request in engine.requests:
        request.finish()
    assert len(await waiting) == 3 and len(await second) == 2


async def test_a_withdrawn_request_is_aborted_in_the_engine(
    scripted: tuple[ImageEngineClient, ScriptedEngine],
) -> None:
    client, engine = scripted
    task = submit(client, req(1))
    await until(lambda: len(engine.requests) == 1, "the hand-over")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert engine.requests[0].aborted and client.queued_images == 0


async def test_a_dead_engine_refuses_before_anything_is_counted(
    scripted: tuple[ImageEngineClient, ScriptedEngine],
) -> None:
    client, engine = scripted
    engine.dead = True
    with pytest.raises(EngineDiedError):
        client.check_admission(req(1))
    with pytest.raises(EngineDiedError):
        await images_of(client.generate(req(1)))
    assert (client.queued_images, client.running_images) == (0, 0)
    assert engine.requests == []  # it never reached the engine


async def test_the_engine_is_asked_once_per_request(
    scripted: tuple[ImageEngineClient, ScriptedEngine],
) -> None:
    """By `generate`; a stream asks `check_admission` before its first event, and its
    `generate(checked=True)` asks the queue again (the counts it changes), not the engine."""
    client, engine = scripted
    plain = submit(client, req(1, 2, 3))
    await until(lambda: len(engine.requests) == 1, "the hand-over")
    assert engine.admissions == 1
    client.check_admission(req(1))
    streamed = asyncio.create_task(images_of(client.generate(req(4), checked=True)))
    await until(lambda: len(engine.requests) == 2, "the second hand-over")
    assert engine.admissions == 2
    with pytest.raises(QueueFullError):
        await images_of(client.generate(req(5, 6), checked=True))
    for request in engine.requests:
        request.finish()
    assert len(await plain) == 3 and len(await streamed) == 1


async def test_close_waits_for_what_an_engine_that_queues_itself_started(
    scripted: tuple[ImageEngineClient, ScriptedEngine],
) -> None:
    client, engine = scripted
    started = submit(client, req(1))
    await until(lambda: len(engine.requests) == 1, "the hand-over")
    engine.requests[0].start(1)
    await until(lambda: client.running_images == 1, "the request to start")
    closing = asyncio.create_task(client.close(drain_timeout_s=WAIT_S))
    await until(lambda: refuses_new_work(client), "the close to refuse new work")
    assert not closing.done() and not engine.closed
    engine.requests[0].finish()
    assert len(await started) == 1
    await asyncio.wait_for(closing, WAIT_S)
    assert engine.closed and not client.is_running


async def test_running_images_counts_concurrent_requests_started_separately() -> None:
    """Each request reports its own start, as vllm-omni's do: the running count is every
    started image of the unanswered requests, and never falls to 0 while one still runs."""
    engine = ScriptedEngine()
    observer = RecordingObserver()
    client = ImageEngineClient(
        engine, "test-model", FLAG_DEFAULTS.admission_config(), observer=observer
    )
    try:
        first = submit(client, req(1, 2))
        second = submit(client, req(3))
        await until(lambda: len(engine.requests) == 2, "both hand-overs")
        first_run, second_run = engine.requests
        first_run.start(2)
        await until(lambda: client.running_images == 2, "the first request to start")
        second_run.start(1)
        await until(lambda: client.running_images == 3, "the second request to start")
        assert client.queued_images == 0
        first_run.finish()
        assert len(await first) == 2
        assert client.running_images == 1  # the second still runs
        second_run.finish()
        assert len(await second) == 1
        assert client.running_images == 0
    finally:
        await client.close()
    assert observer.of("running") == [2, 3, 1, 0]
    assert observer.of("depth") == [2, 3, 1, 0]
