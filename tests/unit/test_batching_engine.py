"""The batching engine: batch formation and fairness, the company wait, withdrawal, close,
hangs and a dead worker, and its engine thread (faults within a batch: test_batching_faults).
Requests go through admission (`ImageEngineClient`), as in the server, unless a test is about
the engine alone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import pytest
from PIL import Image

from tests.support.batching import (
    FLAG_DEFAULTS,
    BrokenObserver,
    RecordingObserver,
    assert_images_of,
    seeds_of,
    serving,
)
from tests.support.engines import FakeClock, FakeRunner, hung_error, images_of, req
from tests.support.waiting import WAIT_S, until
from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.batch_planning import batch_key
from vllm_omni_images.engine.batching import (
    BatchingEngine,
    PreviewCallback,
    StepCallback,
)
from vllm_omni_images.engine.cpu_priority import ENGINE_THREAD_NICENESS
from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineHungError,
    RequestTimeoutError,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.mark.parametrize(
    "fields", [{"max_batch_size": 0}, {"batch_delay_ms": -0.1}, {"hang_grace_s": 0.0}]
)
def test_config_rejects_invalid_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(FLAG_DEFAULTS.batching_config(), **fields)


# Batching and fairness


async def test_concurrent_compatible_requests_share_batches(runner: FakeRunner) -> None:
    async with serving(runner, max_batch_size=4) as served:
        blocker = req(100, 101, 102, 103, width=128)
        held = await served.hold(blocker)
        requests = [req(1), req(2, 3), req(4), req(5), req(6, 7, 8)]
        tasks = await served.submit_queued(*requests)
        assert served.client.running_images == 4
        assert served.client.queued_images == 8
        runner.gate.set()
        for request, images in zip(requests, await asyncio.gather(*tasks), strict=True):
            assert_images_of(request, images)
        assert_images_of(blocker, await held)
    assert [len(batch) for batch in runner.batches] == [1, 3, 2]
    assert runner.batches[1] == requests[:3]
    assert runner.batches[2] == requests[3:]


async def test_oversized_request_runs_alone_and_whole(runner: FakeRunner) -> None:
    async with serving(runner, max_batch_size=2) as served:
        big, small = req(*range(1, 6)), req(9)
        images = await asyncio.gather(
            images_of(served.client.generate(big)), images_of(served.client.generate(small))
        )
        assert_images_of(big, images[0])
        assert_images_of(small, images[1])
    assert runner.batches == [[big], [small]]


async def test_a_waiting_odd_size_is_not_starved(runner: FakeRunner) -> None:
    async with serving(runner, max_batch_size=4) as served:
        held = await served.hold(req(100, 101, 102, 103, width=128))
        odd = req(999, width=96, height=32)
        requests = [req(0), odd, *(req(i) for i in range(1, 20))]
        tasks = await served.submit_queued(*requests)
        runner.gate.set()
        await asyncio.gather(held, *tasks)
    first, second = runner.batches[1:3]
    assert first == requests[:1] + requests[2:5]
    assert second == [odd]


async def test_an_odd_size_at_the_head_goes_first(runner: FakeRunner) -> None:
    async with serving(runner, max_batch_size=4) as served:
        held = await served.hold(req(100, 101, 102, 103, width=128))
        odd = req(999, num_inference_steps=3)
        tasks = await served.submit_queued(odd, *(req(i) for i in range(20)))
        runner.gate.set()
        await asyncio.gather(held, *tasks)
    assert runner.batches[1] == [odd]
    assert len(runner.batches) == 1 + 1 + 5


async def test_different_keys_run_in_different_batches(runner: FakeRunner) -> None:
    async with serving(runner) as served:
        requests = [
            req(1),
            req(2, width=128),
            req(3, num_inference_steps=3),
            req(4, guidance_scale=2.0),
            req(5, true_cfg_scale=4.0),
            req(6, negative_prompt="blurry"),
        ]
        held = await served.hold(req(100, 101, 102, 103, height=128))
        tasks = await served.submit_queued(*requests)
        runner.gate.set()
        await asyncio.gather(held, *tasks)
    assert runner.batches[1:] == [[r] for r in requests]


# The company wait


async def test_a_non_full_batch_runs_as_soon_as_company_fills_it(runner: FakeRunner) -> None:
    async with serving(runner, max_batch_size=2, batch_delay_ms=60_000) as served:
        first = served.submit(req(1))
        await until(lambda: served.client.queued_images == 1, "the first request to queue")
        await asyncio.sleep(0.005)  # time passes: alone, it waits for company
        assert runner.batches == []
        second = await images_of(served.client.generate(req(2)))
        assert_images_of(req(1), await first)
        assert_images_of(req(2), second)
    assert runner.batches == [[req(1), req(2)]]


async def test_a_request_that_already_waited_the_delay_does_not_wait_again(
    runner: FakeRunner,
) -> None:
    clock = FakeClock()
    async with serving(runner, clock=clock, max_batch_size=4, batch_delay_ms=60_000) as served:
        held = await served.hold(req(100, 101, 102, 103, width=128))
        [task] = await served.submit_queued(req(1))
        clock.now += 61.0
        runner.gate.set()
        assert_images_of(req(1), await task)
        await held
    assert runner.batches[1] == [req(1)]


# Withdrawal


async def test_cancel_of_every_request_stops_the_batch_and_moves_on() -> None:
    runner = FakeRunner(steps=50)
    observer = RecordingObserver()
    async with serving(runner, observer=observer) as served:
        runner.gate.clear()
        doomed = [served.submit(req(i, request_id=str(i))) for i in (1, 2)]
        await until(lambda: len(runner.batches) == 1, "the batch to start")
        assert runner.batches == [[req(1), req(2)]]
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        runner.gate.set()
        assert_images_of(req(3), await images_of(served.client.generate(req(3))))
    assert runner.finished == ["cancelled", "ok"]
    assert runner.steps_run == [1, 50]
    assert len(observer.of("end")) == 2  # the stopped batch ended too


async def test_a_partly_abandoned_batch_delivers_to_the_rest() -> None:
    runner = FakeRunner(steps=5)
    async with serving(runner) as served:
        runner.gate.clear()
        gone = served.submit(req(1))
        wanted = served.submit(req(2, 3))
        await until(lambda: len(runner.batches) == 1, "the batch to start")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        runner.gate.set()
        assert_images_of(req(2, 3), await wanted)
    assert runner.batches == [[req(1), req(2, 3)]]
    assert runner.finished == ["ok"]
    assert runner.steps_run == [5]


# Errors


async def test_close_fails_waiting_requests_and_finishes_the_running_batch(
    runner: FakeRunner,
) -> None:
    async with serving(runner) as served:
        held = await served.hold(req(100, width=128))
        [queued] = await served.submit_queued(req(1))
        closing = asyncio.create_task(served.engine.close())
        with pytest.raises(EngineClosedError):
            await queued
        assert not closing.done()
        runner.gate.set()
        await closing
        assert_images_of(req(100), await held)
        assert runner.closed
        with pytest.raises(EngineClosedError):
            await images_of(served.engine.generate(req(2)))
    assert runner.batches == [[req(100, width=128)]]


# Under load


async def test_exactly_once_delivery_under_concurrent_mixed_load() -> None:
    runner = FakeRunner(steps=1)
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
    async with serving(runner, max_batch_size=4, batch_delay_ms=1) as served:

        async def client(request: EngineRequest) -> list[Image.Image]:
            await asyncio.sleep(rng.random() * 0.002)  # arrivals spread over time
            return await images_of(served.client.generate(request))

        results = await asyncio.gather(*(client(r) for r in requests))
    for request, images in zip(requests, results, strict=True):
        assert_images_of(request, images)
    seen = [r for batch in runner.batches for r in batch]
    assert sorted(r.prompt for r in seen) == sorted(r.prompt for r in requests)
    for batch in runner.batches:
        assert len({batch_key(r) for r in batch}) == 1
        assert len(batch) == 1 or sum(r.num_images for r in batch) <= 4


# The observer and the engine thread


async def test_a_broken_observer_does_not_stop_the_worker(runner: FakeRunner) -> None:
    async with serving(runner, observer=BrokenObserver()) as served:
        images = await asyncio.gather(
            images_of(served.client.generate(req(1))), images_of(served.client.generate(req(2)))
        )
        assert_images_of(req(1), images[0])
        assert_images_of(req(2), images[1])


async def test_the_engine_runs_at_a_lower_cpu_priority_than_serving() -> None:
    class PriorityProbe(FakeRunner):
        def run(
            self,
            requests: Sequence[EngineRequest],
            on_step: StepCallback | None = None,
            on_preview: PreviewCallback | None = None,
        ) -> list[list[Image.Image]]:
            self.niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return super().run(requests, on_step, on_preview)

    probe = PriorityProbe()
    serving_niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    async with serving(probe) as served:
        await images_of(served.client.generate(req(1)))
    expected = min(19, serving_niceness + ENGINE_THREAD_NICENESS)
    assert probe.niceness == expected > serving_niceness
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == serving_niceness


# Faults: out of memory retried in halves


async def test_a_call_that_does_not_stop_marks_the_engine_hung_until_it_returns(
    runner: FakeRunner,
) -> None:
    observer = RecordingObserver()
    async with serving(
        runner, observer=observer, request_timeout_s=None, hang_grace_s=0.05
    ) as served:
        runner.gate.clear()  # the call never gets to a step where it could stop: it hangs
        stuck = served.submit(req(1))
        await until(lambda: len(runner.batches) == 1, "the call to start")
        [queued] = await served.submit_queued(req(2, width=128))
        stuck.cancel()  # its only request goes away: the call is asked to stop, and does not
        with pytest.raises(EngineHungError):
            await queued  # a waiting request does not wait for a hung engine
        assert hung_error(served.engine) is not None and served.client.queued_images == 0
        with pytest.raises(EngineHungError, match="not responding"):
            served.client.check_admission(req(1))  # refused at once
        with pytest.raises(EngineHungError, match="not responding"):
            await images_of(served.client.generate(req(3)))
        assert observer.of("hung") == [True]

        runner.gate.set()  # the call returns at last
        await until(lambda: hung_error(served.engine) is None, "the engine to recover")
        assert_images_of(req(4), await images_of(served.client.generate(req(4))))
    assert observer.of("hung") == [True, False]
    assert runner.finished == ["cancelled", "ok"]
    assert [seeds_of(batch) for batch in runner.batches] == [[1], [4]]


async def test_a_call_running_past_the_timeout_and_the_grace_is_a_hang(
    runner: FakeRunner,
) -> None:
    async with serving(runner, request_timeout_s=0.05, hang_grace_s=0.05) as served:
        runner.gate.clear()
        with pytest.raises(RequestTimeoutError):
            await images_of(served.client.generate(req(1)))
        await until(lambda: hung_error(served.engine) is not None, "the engine to be taken as hung")
        runner.gate.set()
        await until(lambda: hung_error(served.engine) is None, "the engine to recover")


async def test_a_call_that_stops_when_asked_is_not_a_hang() -> None:
    runner = FakeRunner(steps=50)
    grace_s = 0.2
    async with serving(runner, request_timeout_s=None, hang_grace_s=grace_s) as served:
        runner.gate.clear()
        task = served.submit(req(1))
        await until(lambda: len(runner.batches) == 1, "the call to start")
        task.cancel()
        runner.gate.set()  # it stops at the end of its next step
        await until(lambda: runner.finished == ["cancelled"], "the call to stop")
        await asyncio.sleep(grace_s * 2)  # past the grace: the check finds the call gone
        assert hung_error(served.engine) is None
        served.engine.check_health()


async def test_close_does_not_wait_for_a_hung_call(runner: FakeRunner) -> None:
    config = dataclasses.replace(FLAG_DEFAULTS.batching_config(), hang_grace_s=0.05)
    engine = BatchingEngine(runner, config, clock=FakeClock())
    runner.gate.clear()
    try:
        stuck = asyncio.create_task(images_of(engine.generate(req(1))))
        await until(lambda: len(runner.batches) == 1, "the call to start")
        stuck.cancel()
        await until(lambda: hung_error(engine) is not None, "the engine to be taken as hung")
        await asyncio.wait_for(engine.close(), WAIT_S)
        with pytest.raises(EngineClosedError):
            await images_of(engine.generate(req(2)))
    finally:
        runner.gate.set()


# Faults: the worker dies


class BreakingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The engine thread pool, refusing work once `broken` (as a bug in the worker would
    stop it from running calls)."""

    broken = False

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        if self.broken:
            raise RuntimeError("the engine thread is gone")
        return super().submit(fn, *args, **kwargs)


async def test_a_dead_worker_fails_what_waits_and_fails_the_health_check(
    runner: FakeRunner,
) -> None:
    executor = BreakingExecutor(max_workers=1)
    try:
        async with serving(runner, executor=executor) as served:
            held = await served.hold(req(100))
            next_batch, waiting = await served.submit_queued(req(1, width=128), req(2, height=128))
            executor.broken = True
            runner.gate.set()
            assert_images_of(req(100), await held)  # the batch before the fault is answered
            # The next batch's request and the one still waiting fail with a 503-class error.
            for task in (next_batch, waiting):
                with pytest.raises(EngineClosedError):
                    await task
            # /health (`check_health`) answers 503 from now on, and requests are refused.
            with pytest.raises(EngineDiedError, match="batching worker stopped"):
                served.engine.check_health()
            with pytest.raises(EngineDiedError):
                served.client.check_admission(req(1))
            with pytest.raises(EngineDiedError):
                await images_of(served.client.generate(req(3)))
            assert (served.client.queued_images, served.client.running_images) == (0, 0)
        assert runner.batches == [[req(100)]]
    finally:
        executor.shutdown()
