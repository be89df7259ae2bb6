"""The image scheduler: batch formation, fairness, limits, timeouts, cancellation, errors,
and faults (out of memory retried in halves, a hung engine)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from PIL import Image

from tests.support.engines import FakeClock, FakeEngine, FakeQueueingEngine, colour, req
from tests.support.waiting import WAIT_S, until
from vllm_omni_images.engine.base import EngineRequest, StepCallback, batch_key
from vllm_omni_images.engine.cpu_priority import ENGINE_THREAD_NICENESS
from vllm_omni_images.engine.errors import (
    EngineDiedError,
    EngineError,
    EngineHungError,
    EngineOutOfMemoryError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
    SchedulerClosedError,
)
from vllm_omni_images.engine.scheduler import (
    BatchSlice,
    ImageScheduler,
    SchedulerConfig,
    SchedulerObserver,
    company_wait_s,
    form_batch,
    split_in_halves,
)


class RecordingObserver(SchedulerObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_queued(self, request: EngineRequest) -> None:
        self.events.append(("queued", request.request_id))

    def on_rejected(self, request: EngineRequest) -> None:
        self.events.append(("rejected", request.request_id))

    def on_batch_start(self, requests: Sequence[EngineRequest], queue_wait_s: list[float]) -> None:
        self.events.append(("start", ([r.request_id for r in requests], queue_wait_s)))

    def on_step(self, step_s: float) -> None:
        self.events.append(("step", step_s))

    def on_batch_end(
        self, requests: Sequence[EngineRequest], engine_s: float, outcome: str
    ) -> None:
        self.events.append(("end", ([r.request_id for r in requests], engine_s, outcome)))

    def on_queue_depth(self, images: int) -> None:
        self.events.append(("depth", images))

    def on_batch_split(self, images: int) -> None:
        self.events.append(("split", images))

    def on_engine_hung(self, hung: bool) -> None:
        self.events.append(("hung", hung))

    def of(self, kind: str) -> list[Any]:
        return [value for name, value in self.events if name == kind]


class BrokenObserver(SchedulerObserver):
    def on_queued(self, request: EngineRequest) -> None:
        raise RuntimeError("observer bug")

    def on_batch_start(self, requests: Sequence[EngineRequest], queue_wait_s: list[float]) -> None:
        raise RuntimeError("observer bug")

    def on_step(self, step_s: float) -> None:
        raise RuntimeError("observer bug")

    def on_batch_end(
        self, requests: Sequence[EngineRequest], engine_s: float, outcome: str
    ) -> None:
        raise RuntimeError("observer bug")

    def on_queue_depth(self, images: int) -> None:
        raise RuntimeError("observer bug")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@contextlib.asynccontextmanager
async def running(
    engine: FakeEngine,
    *,
    clock: Callable[[], float] | None = None,
    observer: SchedulerObserver | None = None,
    **config: Any,
) -> AsyncIterator[ImageScheduler]:
    """A started scheduler (no batch delay unless asked), closed with the gate open."""
    scheduler = ImageScheduler(
        engine,
        SchedulerConfig(**{"batch_delay_s": 0.0, **config}),
        clock=clock or FakeClock(),
        observer=observer,
    )
    scheduler.start()
    try:
        async with asyncio.timeout(WAIT_S * 2):
            yield scheduler
    finally:
        engine.gate.set()
        await scheduler.close()


async def hold(
    scheduler: ImageScheduler, engine: FakeEngine, blocker: EngineRequest
) -> asyncio.Task[list[Image.Image]]:
    """Start `blocker` on a closed gate, so later submissions queue up behind it."""
    engine.gate.clear()
    task = asyncio.create_task(scheduler.submit(blocker))
    await until(lambda: len(engine.batches) == 1)
    return task


async def submit_queued(
    scheduler: ImageScheduler, *requests: EngineRequest
) -> list[asyncio.Task[list[Image.Image]]]:
    depth = scheduler.queue_depth
    tasks = [asyncio.create_task(scheduler.submit(r)) for r in requests]
    await until(lambda: scheduler.queue_depth == depth + len(requests))
    return tasks


def assert_images_of(request: EngineRequest, images: list[Image.Image]) -> None:
    assert [image.getpixel((0, 0)) for image in images] == [colour(s) for s in request.seeds]


# Batch formation, as a pure function


def test_form_batch_groups_compatible_requests_up_to_max_images() -> None:
    assert form_batch([req(i) for i in range(6)], max_images=4) == [0, 1, 2, 3]
    assert form_batch([req(i) for i in range(3)], max_images=4) == [0, 1, 2]
    assert form_batch([], max_images=4) == []


def test_form_batch_keeps_incompatible_requests_apart() -> None:
    queue = [req(1), req(2, width=128), req(3), req(4, width=128), req(5)]
    assert form_batch(queue, max_images=4) == [0, 2, 4]
    assert form_batch(queue[1:], max_images=4) == [0, 2]


def test_form_batch_counts_images_and_skips_requests_that_do_not_fit() -> None:
    assert form_batch([req(1, 2), req(3, 4), req(5)], max_images=4) == [0, 1]
    assert form_batch([req(1, 2, 3), req(4, 5), req(6)], max_images=4) == [0, 2]
    assert form_batch([req(1), req(2, 3, 4, 5), req(6, 7)], max_images=4) == [0, 2]


def test_form_batch_runs_an_oversized_request_alone_and_never_splits_it() -> None:
    assert form_batch([req(*range(6)), req(9)], max_images=4) == [0]
    assert form_batch([req(1), req(*range(10, 16)), req(2)], max_images=4) == [0, 2]


def test_form_batch_always_starts_with_the_oldest_request() -> None:
    odd = req(1, width=96)
    assert form_batch([odd, *(req(i) for i in range(10, 20))], max_images=4) == [0]


@pytest.mark.parametrize(
    "change",
    [
        {"width": 128},
        {"height": 128},
        {"num_inference_steps": 3},
        {"true_cfg_scale": 4.0},
        {"guidance_scale": 1.0},
        {"negative_prompt": ""},
    ],
)
def test_each_batch_key_field_separates_batches(change: dict[str, Any]) -> None:
    base = req(1)
    other = dataclasses.replace(base, seeds=(2,), **change)
    assert batch_key(base) != batch_key(other)
    assert form_batch([base, other], max_images=4) == [0]


def test_prompts_negative_texts_and_seeds_may_differ_within_a_batch() -> None:
    a = req(1, prompt="a fox", negative_prompt="blurry")
    b = req(2, 3, prompt="a cat", negative_prompt="dark")
    assert batch_key(a) == batch_key(b)
    assert form_batch([a, b], max_images=4) == [0, 1]


def test_company_wait_counts_from_the_head_arrival() -> None:
    assert company_wait_s(2, 4, head_arrival=10.0, now=10.002, delay_s=0.005) == pytest.approx(
        0.003
    )
    assert company_wait_s(2, 4, head_arrival=10.0, now=11.0, delay_s=0.005) == 0.0
    assert company_wait_s(4, 4, head_arrival=10.0, now=10.0, delay_s=0.005) == 0.0
    assert company_wait_s(6, 4, head_arrival=10.0, now=10.0, delay_s=0.005) == 0.0


@pytest.mark.parametrize(
    "fields",
    [
        {"max_batch_size": 0},
        {"batch_delay_s": -0.1},
        {"max_queue_images": 0},
        {"request_timeout_s": 0.0},
        {"hang_grace_s": 0.0},
    ],
)
def test_config_rejects_invalid_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**fields)


# The running scheduler


async def test_concurrent_compatible_requests_share_batches(engine: FakeEngine) -> None:
    async with running(engine, max_batch_size=4) as scheduler:
        blocker = req(100, 101, 102, 103, width=128)
        held = await hold(scheduler, engine, blocker)
        requests = [req(1), req(2, 3), req(4), req(5), req(6, 7, 8)]
        tasks = await submit_queued(scheduler, *requests)
        assert scheduler.running_images == 4
        assert scheduler.queued_images == 8
        engine.gate.set()
        for request, images in zip(requests, await asyncio.gather(*tasks), strict=True):
            assert_images_of(request, images)
        assert_images_of(blocker, await held)
    assert [len(batch) for batch in engine.batches] == [1, 3, 2]
    assert engine.batches[1] == requests[:3]
    assert engine.batches[2] == requests[3:]


async def test_oversized_request_runs_alone_and_whole(engine: FakeEngine) -> None:
    async with running(engine, max_batch_size=2) as scheduler:
        big, small = req(*range(1, 6)), req(9)
        images = await asyncio.gather(scheduler.submit(big), scheduler.submit(small))
        assert_images_of(big, images[0])
        assert_images_of(small, images[1])
    assert engine.batches == [[big], [small]]


async def test_a_waiting_odd_size_is_not_starved(engine: FakeEngine) -> None:
    async with running(engine, max_batch_size=4) as scheduler:
        held = await hold(scheduler, engine, req(100, 101, 102, 103, width=128))
        odd = req(999, width=96, height=32)
        requests = [req(0), odd, *(req(i) for i in range(1, 20))]
        tasks = await submit_queued(scheduler, *requests)
        engine.gate.set()
        await asyncio.gather(held, *tasks)
    first, second = engine.batches[1:3]
    assert first == requests[:1] + requests[2:5]
    assert second == [odd]


async def test_an_odd_size_at_the_head_goes_first(engine: FakeEngine) -> None:
    async with running(engine, max_batch_size=4) as scheduler:
        held = await hold(scheduler, engine, req(100, 101, 102, 103, width=128))
        odd = req(999, num_inference_steps=3)
        tasks = await submit_queued(scheduler, odd, *(req(i) for i in range(20)))
        engine.gate.set()
        await asyncio.gather(held, *tasks)
    assert engine.batches[1] == [odd]
    assert len(engine.batches) == 1 + 1 + 5


async def test_different_keys_run_in_different_batches(engine: FakeEngine) -> None:
    async with running(engine) as scheduler:
        requests = [
            req(1),
            req(2, width=128),
            req(3, num_inference_steps=3),
            req(4, guidance_scale=2.0),
            req(5, true_cfg_scale=4.0),
            req(6, negative_prompt="blurry"),
        ]
        held = await hold(scheduler, engine, req(100, 101, 102, 103, height=128))
        tasks = await submit_queued(scheduler, *requests)
        engine.gate.set()
        await asyncio.gather(held, *tasks)
    assert engine.batches[1:] == [[r] for r in requests]


async def test_a_non_full_batch_runs_as_soon_as_company_fills_it(engine: FakeEngine) -> None:
    async with running(engine, max_batch_size=2, batch_delay_s=60.0) as scheduler:
        first = asyncio.create_task(scheduler.submit(req(1)))
        await until(lambda: scheduler.queue_depth == 1)
        await asyncio.sleep(0.005)
        assert engine.batches == []
        second = await scheduler.submit(req(2))
        assert_images_of(req(1), await first)
        assert_images_of(req(2), second)
    assert engine.batches == [[req(1), req(2)]]


async def test_a_request_that_already_waited_the_delay_does_not_wait_again(
    engine: FakeEngine,
) -> None:
    clock = FakeClock()
    async with running(engine, clock=clock, max_batch_size=4, batch_delay_s=60.0) as scheduler:
        held = await hold(scheduler, engine, req(100, 101, 102, 103, width=128))
        [task] = await submit_queued(scheduler, req(1))
        clock.now += 61.0
        engine.gate.set()
        assert_images_of(req(1), await task)
        await held
    assert engine.batches[1] == [req(1)]


async def test_queue_limit_refuses_and_cancelled_requests_free_their_place(
    engine: FakeEngine,
) -> None:
    observer = RecordingObserver()
    async with running(engine, observer=observer, max_queue_images=4) as scheduler:
        held = await hold(scheduler, engine, req(100, 101, 102, 103))
        first, second = await submit_queued(scheduler, req(1, 2), req(3))
        assert scheduler.queued_images == 3
        with pytest.raises(QueueFullError) as refused:
            await scheduler.submit(req(4, 5, request_id="refused"))
        assert refused.value.retry_after_s >= 1.0
        assert observer.of("rejected")[0] == "refused"

        first.cancel()
        await until(lambda: scheduler.queued_images == 1)
        [third] = await submit_queued(scheduler, req(4, 5))
        engine.gate.set()
        await asyncio.gather(held, second, third)
        with pytest.raises(asyncio.CancelledError):
            await first
    assert all(req(1, 2) not in batch for batch in engine.batches)


async def test_a_request_larger_than_the_whole_queue_is_refused_at_once(
    engine: FakeEngine,
) -> None:
    too_large = req(*range(10, 15))
    async with running(engine, max_queue_images=4) as scheduler:
        # Refused on an idle scheduler too: it could never fit, however long it waited.
        with pytest.raises(RequestTooLargeError) as refused:
            await scheduler.submit(too_large)
        assert (refused.value.num_images, refused.value.max_queue_images) == (5, 4)
        assert scheduler.queued_images == 0

        held = await hold(scheduler, engine, req(100, 101, 102, 103))
        [queued] = await submit_queued(scheduler, req(1, 2, 3))
        with pytest.raises(QueueFullError):
            await scheduler.submit(req(4, 5))  # fits the queue, just not now
        with pytest.raises(RequestTooLargeError):
            await scheduler.submit(too_large)
        engine.gate.set()
        await asyncio.gather(held, queued)
    assert engine.batches == [[req(100, 101, 102, 103)], [req(1, 2, 3)]]


async def test_timeout_while_queued(engine: FakeEngine) -> None:
    async with running(engine, request_timeout_s=0.05) as scheduler:
        engine.gate.clear()
        held = asyncio.create_task(scheduler.submit(req(100, width=128)))
        await until(lambda: len(engine.batches) == 1)
        with pytest.raises(RequestTimeoutError):
            await scheduler.submit(req(1))
        assert scheduler.queue_depth == 0
        assert scheduler.queued_images == 0
        with pytest.raises(RequestTimeoutError):
            await held
    assert engine.batches == [[req(100, width=128)]]


async def test_timeout_while_running_stops_the_batch(engine: FakeEngine) -> None:
    observer = RecordingObserver()
    async with running(engine, observer=observer, request_timeout_s=0.05) as scheduler:
        engine.gate.clear()
        with pytest.raises(RequestTimeoutError):
            await scheduler.submit(req(1, request_id="slow"))
        engine.gate.set()
        await until(lambda: observer.of("end") != [])
    assert engine.finished == ["cancelled"]
    assert engine.steps_run == [1]
    [(ids, _, outcome)] = observer.of("end")
    assert (ids, outcome) == (["slow"], "cancelled")


async def test_cancel_while_queued_removes_the_request(engine: FakeEngine) -> None:
    async with running(engine) as scheduler:
        held = await hold(scheduler, engine, req(100, width=128))
        [queued] = await submit_queued(scheduler, req(1))
        queued.cancel()
        await until(lambda: scheduler.queue_depth == 0)
        assert scheduler.queued_images == 0
        engine.gate.set()
        assert_images_of(req(100), await held)
    assert engine.batches == [[req(100, width=128)]]


async def test_cancel_of_every_request_stops_the_batch_and_moves_on() -> None:
    engine = FakeEngine(steps=50)
    observer = RecordingObserver()
    async with running(engine, observer=observer) as scheduler:
        engine.gate.clear()
        doomed = [asyncio.create_task(scheduler.submit(req(i, request_id=str(i)))) for i in (1, 2)]
        await until(lambda: len(engine.batches) == 1)
        assert engine.batches == [[req(1), req(2)]]
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        engine.gate.set()
        assert_images_of(req(3), await scheduler.submit(req(3)))
    assert engine.finished == ["cancelled", "ok"]
    assert engine.steps_run == [1, 50]
    assert [outcome for _, _, outcome in observer.of("end")] == ["cancelled", "ok"]


async def test_a_partly_abandoned_batch_delivers_to_the_rest() -> None:
    engine = FakeEngine(steps=5)
    async with running(engine) as scheduler:
        engine.gate.clear()
        gone = asyncio.create_task(scheduler.submit(req(1)))
        wanted = asyncio.create_task(scheduler.submit(req(2, 3)))
        await until(lambda: len(engine.batches) == 1)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        engine.gate.set()
        assert_images_of(req(2, 3), await wanted)
    assert engine.batches == [[req(1), req(2, 3)]]
    assert engine.finished == ["ok"]
    assert engine.steps_run == [5]


@pytest.mark.parametrize("error", [EngineError("broken"), RuntimeError("bug")])
async def test_engine_error_fails_only_its_batch(engine: FakeEngine, error: Exception) -> None:
    observer = RecordingObserver()
    engine.fail_with["boom"] = error
    async with running(engine, observer=observer) as scheduler:
        held = await hold(scheduler, engine, req(100, width=128))
        failing = await submit_queued(scheduler, req(1, prompt="boom"), req(2, prompt="x"))
        [fine] = await submit_queued(scheduler, req(3, height=128))
        engine.gate.set()
        for task in failing:
            with pytest.raises(type(error)) as raised:
                await task
            assert raised.value is error
        assert_images_of(req(3), await fine)
        await held
    assert engine.finished == ["ok", "error", "ok"]
    assert [outcome for _, _, outcome in observer.of("end")] == ["ok", "error", "ok"]


async def test_a_bad_engine_result_is_an_error_not_a_misdelivery(engine: FakeEngine) -> None:
    engine.generate = lambda requests, on_step=None: [[]]  # type: ignore[method-assign]
    async with running(engine) as scheduler:
        with pytest.raises(EngineError, match="returned"):
            await scheduler.submit(req(1))


async def test_close_fails_waiting_requests_and_finishes_the_running_batch(
    engine: FakeEngine,
) -> None:
    async with running(engine) as scheduler:
        held = await hold(scheduler, engine, req(100, width=128))
        [queued] = await submit_queued(scheduler, req(1))
        closing = asyncio.create_task(scheduler.close())
        with pytest.raises(SchedulerClosedError):
            await queued
        assert not closing.done()
        engine.gate.set()
        await closing
        assert_images_of(req(100), await held)
        with pytest.raises(SchedulerClosedError):
            await scheduler.submit(req(2))
    assert engine.batches == [[req(100, width=128)]]


async def test_exactly_once_delivery_under_concurrent_mixed_load() -> None:
    engine = FakeEngine(steps=1)
    rng = random.Random(7)
    requests = [
        req(
            *(i * 10 + k for k in range(rng.choice([1, 1, 2, 3, 5]))),
            width=rng.choice([64, 128]),
            num_inference_steps=rng.choice([2, 3]),
            prompt=f"prompt {i}",
        )
        for i in range(50)
    ]
    async with running(engine, max_batch_size=4, batch_delay_s=0.001) as scheduler:

        async def client(request: EngineRequest) -> list[Image.Image]:
            await asyncio.sleep(rng.random() * 0.002)
            return await scheduler.submit(request)

        results = await asyncio.gather(*(client(r) for r in requests))
    for request, images in zip(requests, results, strict=True):
        assert_images_of(request, images)
    seen = [r for batch in engine.batches for r in batch]
    assert sorted(r.prompt for r in seen) == sorted(r.prompt for r in requests)
    for batch in engine.batches:
        assert len({batch_key(r) for r in batch}) == 1
        assert len(batch) == 1 or sum(r.num_images for r in batch) <= 4


async def test_observer_sees_queue_waits_steps_and_outcomes() -> None:
    clock = FakeClock()
    engine = FakeEngine(steps=3, clock=clock)
    observer = RecordingObserver()
    async with running(engine, clock=clock, observer=observer) as scheduler:
        held = await hold(scheduler, engine, req(100, width=128, request_id="blocker"))
        [queued] = await submit_queued(scheduler, req(1, 2, request_id="queued"))
        clock.now = 10.0
        engine.gate.set()
        await asyncio.gather(held, queued)
    assert observer.of("queued") == ["blocker", "queued"]
    assert observer.of("start") == [(["blocker"], [0.0]), (["queued"], [13.0])]
    assert observer.of("step") == [11.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert observer.of("end") == [(["blocker"], 13.0, "ok"), (["queued"], 3.0, "ok")]
    assert observer.of("depth") == [1, 0, 2, 0]


async def test_a_broken_observer_does_not_stop_the_worker(engine: FakeEngine) -> None:
    async with running(engine, observer=BrokenObserver()) as scheduler:
        images = await asyncio.gather(scheduler.submit(req(1)), scheduler.submit(req(2)))
        assert_images_of(req(1), images[0])
        assert_images_of(req(2), images[1])


async def test_the_engine_runs_at_a_lower_cpu_priority_than_serving() -> None:
    class PriorityProbe(FakeEngine):
        def generate(
            self, requests: Sequence[EngineRequest], on_step: StepCallback | None = None
        ) -> list[list[Image.Image]]:
            self.niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return super().generate(requests, on_step)

    probe = PriorityProbe()
    serving_niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    async with running(probe) as scheduler:
        await scheduler.submit(req(1))
    expected = min(19, serving_niceness + ENGINE_THREAD_NICENESS)
    assert probe.niceness == expected > serving_niceness
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == serving_niceness


# Hand-over mode: an engine that queues and batches by itself


@pytest.fixture
async def handing_over() -> AsyncIterator[tuple[ImageScheduler, FakeQueueingEngine]]:
    engine = FakeQueueingEngine()
    scheduler = ImageScheduler(engine, SchedulerConfig(max_queue_images=4))
    yield scheduler, engine
    await scheduler.close()


async def test_a_request_is_handed_over_at_once_and_counts_as_queued_until_it_starts(
    handing_over: tuple[ImageScheduler, FakeQueueingEngine],
) -> None:
    scheduler, engine = handing_over
    task = asyncio.create_task(scheduler.submit(req(1, 2, 3)))
    await until(lambda: len(engine.jobs) == 1, "the hand-over")
    assert (scheduler.queued_images, scheduler.running_images) == (3, 0)
    engine.jobs[0].on_started(2)  # vllm-omni may start a request's images in different batches
    await until(lambda: scheduler.running_images == 2, "two started images")
    assert scheduler.queued_images == 1
    engine.jobs[0].on_started(1)
    await until(lambda: scheduler.queued_images == 0, "the last image to start")
    engine.jobs[0].finish()
    assert [image.getpixel((0, 0)) for image in await task] == [colour(s) for s in (1, 2, 3)]
    assert scheduler.running_images == 0


async def test_admission_counts_the_images_waiting_in_the_engine(
    handing_over: tuple[ImageScheduler, FakeQueueingEngine],
) -> None:
    scheduler, engine = handing_over
    waiting = asyncio.create_task(scheduler.submit(req(1, 2, 3)))
    await until(lambda: len(engine.jobs) == 1, "the hand-over")
    with pytest.raises(QueueFullError):
        await scheduler.submit(req(4, 5))
    assert len(engine.jobs) == 1  # a refused request never reaches the engine
    engine.jobs[0].on_started(3)
    await until(lambda: scheduler.queued_images == 0, "the images to start")
    second = asyncio.create_task(scheduler.submit(req(4, 5)))
    await until(lambda: len(engine.jobs) == 2, "the second hand-over")
    for job in engine.jobs:
        job.finish()
    assert len(await waiting) == 3 and len(await second) == 2


async def test_a_withdrawn_request_is_aborted_in_the_engine(
    handing_over: tuple[ImageScheduler, FakeQueueingEngine],
) -> None:
    scheduler, engine = handing_over
    task = asyncio.create_task(scheduler.submit(req(1)))
    await until(lambda: len(engine.jobs) == 1, "the hand-over")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert engine.jobs[0].aborted and scheduler.queued_images == 0


async def test_a_dead_engine_refuses_before_anything_is_counted(
    handing_over: tuple[ImageScheduler, FakeQueueingEngine],
) -> None:
    scheduler, engine = handing_over
    engine.dead = True
    with pytest.raises(EngineDiedError):
        await scheduler.submit(req(1))
    assert (scheduler.queued_images, scheduler.queue_depth) == (0, 0)


async def test_close_fails_the_waiting_and_waits_for_the_started(
    handing_over: tuple[ImageScheduler, FakeQueueingEngine],
) -> None:
    scheduler, engine = handing_over
    started = asyncio.create_task(scheduler.submit(req(1)))
    waiting = asyncio.create_task(scheduler.submit(req(2)))
    await until(lambda: len(engine.jobs) == 2, "both hand-overs")
    engine.jobs[0].on_started(1)
    await until(lambda: scheduler.running_images == 1, "the first to start")
    closing = asyncio.create_task(scheduler.close())
    with pytest.raises(SchedulerClosedError):
        await waiting
    assert engine.jobs[1].aborted and not closing.done()
    engine.jobs[0].finish()
    assert len(await started) == 1
    await asyncio.wait_for(closing, WAIT_S)


# Faults: out of memory retried in halves


def seeds_of(batch: Sequence[EngineRequest]) -> list[int]:
    return [seed for request in batch for seed in request.seeds]


def out_of_memory(
    above: int, *, even_alone: frozenset[str] = frozenset()
) -> Callable[[Sequence[EngineRequest]], None]:
    """A `FakeEngine.fault`: out of memory for a batch of more than `above` images, or with an
    image of a prompt in `even_alone`."""

    def fault(requests: Sequence[EngineRequest]) -> None:
        too_many = sum(request.num_images for request in requests) > above
        if too_many or any(request.prompt in even_alone for request in requests):
            raise EngineOutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    return fault


def test_split_in_halves_cuts_at_the_middle_image() -> None:
    four = [BatchSlice(index, 0, 1) for index in range(4)]
    assert split_in_halves(four) == (four[:2], four[2:])
    # A request across the middle goes to both halves, its seeds in order.
    assert split_in_halves([BatchSlice(0, 0, 1), BatchSlice(1, 0, 3)]) == (
        [BatchSlice(0, 0, 1), BatchSlice(1, 0, 1)],
        [BatchSlice(1, 1, 3)],
    )
    assert split_in_halves([BatchSlice(0, 0, 4)]) == ([BatchSlice(0, 0, 2)], [BatchSlice(0, 2, 4)])
    # An odd count: the first half is the larger; a part of a request splits again.
    assert split_in_halves([BatchSlice(0, 2, 5)]) == ([BatchSlice(0, 2, 4)], [BatchSlice(0, 4, 5)])
    with pytest.raises(ValueError):
        split_in_halves([BatchSlice(0, 0, 1)])


def test_split_in_halves_keeps_every_image_once_in_order() -> None:
    rng = random.Random(3)
    for _ in range(200):
        slices = [BatchSlice(i, 0, rng.randint(1, 5)) for i in range(rng.randint(1, 6))]
        if sum(part.num_images for part in slices) < 2:
            continue
        first, second = split_in_halves(slices)
        images = [(p.index, seed) for p in first + second for seed in range(p.start, p.stop)]
        assert images == [(p.index, seed) for p in slices for seed in range(p.start, p.stop)]
        sizes = [sum(part.num_images for part in half) for half in (first, second)]
        assert 0 <= sizes[0] - sizes[1] <= 1


async def test_out_of_memory_retries_the_batch_in_halves(engine: FakeEngine) -> None:
    engine.fault = out_of_memory(above=2)
    observer = RecordingObserver()
    async with running(engine, observer=observer, max_batch_size=4) as scheduler:
        held = await hold(scheduler, engine, req(100, width=128))
        requests = [req(i, request_id=str(i)) for i in range(1, 5)]
        tasks = await submit_queued(scheduler, *requests)
        engine.gate.set()
        for request, images in zip(requests, await asyncio.gather(*tasks), strict=True):
            assert_images_of(request, images)
        await held
    assert [seeds_of(batch) for batch in engine.batches[1:]] == [[1, 2, 3, 4], [1, 2], [3, 4]]
    assert engine.finished == ["ok", "error", "ok", "ok"]
    assert observer.of("split") == [4]
    # One batch for the observer (and the metrics), however many calls it took.
    assert len(observer.of("start")) == 2
    assert [outcome for _, _, outcome in observer.of("end")] == ["ok", "ok"]


async def test_out_of_memory_splits_a_requests_images_and_keeps_their_order(
    engine: FakeEngine,
) -> None:
    engine.fault = out_of_memory(above=1)
    async with running(engine, max_batch_size=4) as scheduler:
        request = req(1, 2, 3, 4, 5, request_id="five")
        assert_images_of(request, await scheduler.submit(request))
    assert [seeds_of(batch) for batch in engine.batches] == [
        [1, 2, 3, 4, 5],
        [1, 2, 3],
        [1, 2],
        [1],
        [2],
        [3],
        [4, 5],
        [4],
        [5],
    ]
    # Each part is the same request with fewer seeds: the same image for the same seed.
    assert all(
        batch == [dataclasses.replace(request, seeds=batch[0].seeds)] for batch in engine.batches
    )


async def test_a_request_split_across_the_halves_gets_its_images_in_order(
    engine: FakeEngine,
) -> None:
    engine.fault = out_of_memory(above=2)
    async with running(engine, max_batch_size=4) as scheduler:
        held = await hold(scheduler, engine, req(100, width=128))
        one, three = req(1), req(2, 3, 4)
        tasks = await submit_queued(scheduler, one, three)
        engine.gate.set()
        images = await asyncio.gather(*tasks)
        await held
    assert_images_of(one, images[0])
    assert_images_of(three, images[1])
    assert [seeds_of(batch) for batch in engine.batches[1:]] == [[1, 2, 3, 4], [1, 2], [3, 4]]


async def test_an_image_that_does_not_fit_alone_fails_only_its_request(engine: FakeEngine) -> None:
    engine.fault = out_of_memory(above=4, even_alone=frozenset({"huge"}))
    observer = RecordingObserver()
    async with running(engine, observer=observer, max_batch_size=4) as scheduler:
        held = await hold(scheduler, engine, req(100, width=128))
        requests = [req(1), req(2, 3, prompt="huge", request_id="huge"), req(4)]
        first, huge, last = await submit_queued(scheduler, *requests)
        engine.gate.set()
        assert_images_of(requests[0], await first)
        assert_images_of(requests[2], await last)
        with pytest.raises(EngineOutOfMemoryError, match="64x64 image did not fit, even alone"):
            await huge
        await held
    # The huge request's second image is not tried once its first failed alone.
    assert [seeds_of(batch) for batch in engine.batches[1:]] == [
        [1, 2, 3, 4],
        [1, 2],
        [1],
        [2],
        [4],
    ]
    assert observer.of("split") == [4, 2]
    assert [outcome for _, _, outcome in observer.of("end")] == ["ok", "error"]


async def test_a_request_withdrawn_between_tries_is_not_retried(engine: FakeEngine) -> None:
    engine.fault = out_of_memory(above=1)
    async with running(engine, max_batch_size=4) as scheduler:
        engine.gate.clear()  # the first call fails before its first step; the retry waits
        kept = asyncio.create_task(scheduler.submit(req(1)))
        gone = asyncio.create_task(scheduler.submit(req(2)))
        await until(lambda: len(engine.batches) == 2, "the first retry")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        engine.gate.set()
        assert_images_of(req(1), await kept)
    assert [seeds_of(batch) for batch in engine.batches] == [[1, 2], [1]]


async def test_a_retried_request_sends_each_preview_once(engine: FakeEngine) -> None:
    previews: list[int] = []
    oom = out_of_memory(above=1)

    def previews_then_oom(requests: Sequence[EngineRequest]) -> None:
        for request in requests:
            if request.on_preview is not None:
                request.on_preview(0, [])
        oom(requests)

    engine.fault = previews_then_oom
    async with running(engine, max_batch_size=4) as scheduler:
        held = await hold(scheduler, engine, req(100, width=128))
        streamed = req(1, on_preview=lambda index, images: previews.append(index))
        tasks = await submit_queued(scheduler, streamed, req(2))
        engine.gate.set()
        await asyncio.gather(held, *tasks)
    assert [seeds_of(batch) for batch in engine.batches[1:]] == [[1, 2], [1], [2]]
    assert previews == [0]


# Faults: a hung engine


async def test_a_call_that_does_not_stop_marks_the_engine_hung_until_it_returns(
    engine: FakeEngine,
) -> None:
    observer = RecordingObserver()
    async with running(
        engine, observer=observer, request_timeout_s=None, hang_grace_s=0.05
    ) as scheduler:
        engine.gate.clear()  # the call never gets to a step where it could stop: it hangs
        stuck = asyncio.create_task(scheduler.submit(req(1)))
        await until(lambda: len(engine.batches) == 1, "the call to start")
        [queued] = await submit_queued(scheduler, req(2, width=128))
        stuck.cancel()  # its only request goes away: the call is asked to stop, and does not
        with pytest.raises(EngineHungError):
            await queued  # a waiting request does not wait for a hung engine
        assert scheduler.hung_error() is not None and scheduler.queued_images == 0
        with pytest.raises(EngineHungError, match="not responding"):
            await scheduler.submit(req(3))  # refused at once
        assert observer.of("hung") == [True]

        engine.gate.set()  # the call returns at last
        await until(lambda: scheduler.hung_error() is None, "the engine to recover")
        assert_images_of(req(4), await scheduler.submit(req(4)))
    assert observer.of("hung") == [True, False]
    assert engine.finished == ["cancelled", "ok"]
    assert [seeds_of(batch) for batch in engine.batches] == [[1], [4]]


async def test_a_call_running_past_the_timeout_and_the_grace_is_a_hang(engine: FakeEngine) -> None:
    async with running(engine, request_timeout_s=0.05, hang_grace_s=0.05) as scheduler:
        engine.gate.clear()
        with pytest.raises(RequestTimeoutError):
            await scheduler.submit(req(1))
        await until(lambda: scheduler.hung_error() is not None, "the engine to be taken as hung")
        engine.gate.set()
        await until(lambda: scheduler.hung_error() is None, "the engine to recover")


async def test_a_call_that_stops_when_asked_is_not_a_hang() -> None:
    engine = FakeEngine(steps=50)
    grace_s = 0.2
    async with running(engine, request_timeout_s=None, hang_grace_s=grace_s) as scheduler:
        engine.gate.clear()
        task = asyncio.create_task(scheduler.submit(req(1)))
        await until(lambda: len(engine.batches) == 1, "the call to start")
        task.cancel()
        engine.gate.set()  # it stops at the end of its next step
        await until(lambda: engine.finished == ["cancelled"], "the call to stop")
        await asyncio.sleep(grace_s * 2)  # past the grace: the check finds the call gone
        assert scheduler.hung_error() is None


async def test_close_does_not_wait_for_a_hung_call(engine: FakeEngine) -> None:
    scheduler = ImageScheduler(
        engine, SchedulerConfig(request_timeout_s=None, hang_grace_s=0.05), clock=FakeClock()
    )
    engine.gate.clear()
    try:
        stuck = asyncio.create_task(scheduler.submit(req(1)))
        await until(lambda: len(engine.batches) == 1, "the call to start")
        stuck.cancel()
        await until(lambda: scheduler.hung_error() is not None, "the engine to be taken as hung")
        await asyncio.wait_for(scheduler.close(), WAIT_S)
        with pytest.raises(SchedulerClosedError):
            await scheduler.submit(req(2))
    finally:
        engine.gate.set()
