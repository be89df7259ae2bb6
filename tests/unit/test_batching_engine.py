"""The batching engine: batch formation and fairness, the company wait, withdrawal, errors,
faults (out of memory retried in halves, a hung call, a dead worker), close, and its engine
thread. Requests go through admission (`ImageEngineClient`), as in the server, unless a test
is about the engine alone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import random
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import pytest
from PIL import Image

from tests.support.batching import (
    FLAG_DEFAULTS,
    BrokenObserver,
    RecordingObserver,
    assert_images_of,
    serving,
)
from tests.support.engines import FakeClock, FakeRunner, hung_error, images_of, req
from tests.support.waiting import WAIT_S, until
from vllm_omni_images.engine.base import EngineOutput, EngineRequest, FinalImages, PreviewImages
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
    EngineError,
    EngineHungError,
    EngineOutOfMemoryError,
    RequestTimeoutError,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


def seeds_of(batch: Sequence[EngineRequest]) -> list[int]:
    return [seed for request in batch for seed in request.seeds]


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


@pytest.mark.parametrize("error", [EngineError("broken"), RuntimeError("bug")])
async def test_engine_error_fails_only_its_request(runner: FakeRunner, error: Exception) -> None:
    observer = RecordingObserver()
    runner.fail_with["boom"] = error  # any call that "boom" leads fails
    async with serving(runner, observer=observer) as served:
        held = await served.hold(req(100, width=128))
        failing, companion = await served.submit_queued(req(1, prompt="boom"), req(2, prompt="x"))
        [fine] = await served.submit_queued(req(3, height=128))
        runner.gate.set()
        with pytest.raises(type(error)) as raised:
            await failing
        assert raised.value is error
        assert_images_of(req(2), await companion)  # retried alone: its own images
        assert_images_of(req(3), await fine)
        await held
    assert [seeds_of(batch) for batch in runner.batches] == [[100], [1, 2], [1], [2], [3]]
    assert runner.finished == ["ok", "error", "error", "ok", "ok"]
    assert observer.of("isolated") == [2]
    assert len(observer.of("end")) == 3  # one batch for the metrics, however many calls


def fails_with(prompt: str, error: Exception) -> Callable[[Sequence[EngineRequest]], None]:
    """A `FakeRunner.fault`: `error` for any call with a request of `prompt`."""

    def fault(requests: Sequence[EngineRequest]) -> None:
        if any(request.prompt == prompt for request in requests):
            raise error

    return fault


async def test_a_failed_batch_runs_each_request_alone_once(runner: FakeRunner) -> None:
    runner.fault = fails_with("bad", EngineError("TypeError: TextEncodeInput must be ..."))
    observer = RecordingObserver()
    async with serving(runner, observer=observer, max_batch_size=4) as served:
        held = await served.hold(req(100, width=128))
        requests = [req(1), req(2, prompt="bad"), req(3, 4)]
        tasks = await served.submit_queued(*requests)
        runner.gate.set()
        first, bad, last = await asyncio.gather(*tasks, return_exceptions=True)
        await held
    assert_images_of(requests[0], first)
    assert_images_of(requests[2], last)
    assert isinstance(bad, EngineError) and "TextEncodeInput" in str(bad)
    # The failed request's call alone is its last: it is not tried again.
    assert [seeds_of(batch) for batch in runner.batches[1:]] == [[1, 2, 3, 4], [1], [2], [3, 4]]
    assert observer.of("isolated") == [3]
    assert observer.of("start") == [1, 4]
    assert observer.of("split") == []


@pytest.mark.parametrize(
    "error",
    [EngineDiedError("the worker died"), EngineHungError(1.0), EngineClosedError()],
)
async def test_the_whole_engines_failure_is_not_retried_request_by_request(
    runner: FakeRunner, error: Exception
) -> None:
    runner.fault = fails_with("a red fox", error)
    async with serving(runner, max_batch_size=4) as served:
        held = await served.hold(req(100, prompt="held", width=128))
        tasks = await served.submit_queued(req(1), req(2))
        runner.gate.set()
        for task in tasks:
            with pytest.raises(type(error)):
                await task
        await held
    assert [seeds_of(batch) for batch in runner.batches[1:]] == [[1, 2]]


async def test_a_failure_in_an_out_of_memory_half_isolates_that_halfs_requests(
    runner: FakeRunner,
) -> None:
    out_of_memory_above_2 = out_of_memory(above=2)
    failing = fails_with("bad", EngineError("broken"))

    def fault(requests: Sequence[EngineRequest]) -> None:
        out_of_memory_above_2(requests)
        failing(requests)

    runner.fault = fault
    observer = RecordingObserver()
    async with serving(runner, observer=observer, max_batch_size=4) as served:
        held = await served.hold(req(100, width=128))
        requests = [req(1), req(2, prompt="bad"), req(3), req(4)]
        tasks = await served.submit_queued(*requests)
        runner.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await held
    assert isinstance(results[1], EngineError)
    for index in (0, 2, 3):
        assert_images_of(requests[index], results[index])
    assert [seeds_of(batch) for batch in runner.batches[1:]] == [
        [1, 2, 3, 4],
        [1, 2],
        [1],
        [2],
        [3, 4],
    ]
    assert observer.of("split") == [4]
    assert observer.of("isolated") == [2]


async def test_a_request_withdrawn_before_its_turn_alone_is_not_run(runner: FakeRunner) -> None:
    runner.fault = fails_with("bad", EngineError("broken"))
    async with serving(runner, max_batch_size=4) as served:
        runner.gate.clear()  # the batch fails before its first step; the first retry waits
        kept, bad, gone = (served.submit(r) for r in (req(1), req(2, prompt="bad"), req(3)))
        await until(lambda: len(runner.batches) == 2, "the first request's call alone")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        runner.gate.set()
        assert_images_of(req(1), await kept)
        with pytest.raises(EngineError):
            await bad
    assert [seeds_of(batch) for batch in runner.batches] == [[1, 2, 3], [1], [2]]


# Close


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


def out_of_memory(
    above: int, *, even_alone: frozenset[str] = frozenset()
) -> Callable[[Sequence[EngineRequest]], None]:
    """A `FakeRunner.fault`: out of memory for a call of more than `above` images, or with an
    image of a prompt in `even_alone`."""

    def fault(requests: Sequence[EngineRequest]) -> None:
        too_many = sum(request.num_images for request in requests) > above
        if too_many or any(request.prompt in even_alone for request in requests):
            raise EngineOutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    return fault


async def test_out_of_memory_retries_the_batch_in_halves(runner: FakeRunner) -> None:
    runner.fault = out_of_memory(above=2)
    observer = RecordingObserver()
    async with serving(runner, observer=observer, max_batch_size=4) as served:
        held = await served.hold(req(100, width=128))
        requests = [req(i, request_id=str(i)) for i in range(1, 5)]
        tasks = await served.submit_queued(*requests)
        runner.gate.set()
        for request, images in zip(requests, await asyncio.gather(*tasks), strict=True):
            assert_images_of(request, images)
        await held
    assert [seeds_of(batch) for batch in runner.batches[1:]] == [[1, 2, 3, 4], [1, 2], [3, 4]]
    assert runner.finished == ["ok", "error", "ok", "ok"]
    assert observer.of("split") == [4]
    # One batch for the observer (and the metrics), however many calls it took.
    assert observer.of("start") == [1, 4]
    assert len(observer.of("end")) == 2


async def test_out_of_memory_splits_a_requests_images_and_keeps_their_order(
    runner: FakeRunner,
) -> None:
    runner.fault = out_of_memory(above=1)
    async with serving(runner, max_batch_size=4) as served:
        request = req(1, 2, 3, 4, 5, request_id="five")
        assert_images_of(request, await images_of(served.client.generate(request)))
    assert [seeds_of(batch) for batch in runner.batches] == [
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
        batch == [dataclasses.replace(request, seeds=batch[0].seeds)] for batch in runner.batches
    )


async def test_a_request_split_across_the_halves_gets_its_images_in_order(
    runner: FakeRunner,
) -> None:
    runner.fault = out_of_memory(above=2)
    async with serving(runner, max_batch_size=4) as served:
        held = await served.hold(req(100, width=128))
        one, three = req(1), req(2, 3, 4)
        tasks = await served.submit_queued(one, three)
        runner.gate.set()
        images = await asyncio.gather(*tasks)
        await held
    assert_images_of(one, images[0])
    assert_images_of(three, images[1])
    assert [seeds_of(batch) for batch in runner.batches[1:]] == [[1, 2, 3, 4], [1, 2], [3, 4]]


async def test_an_image_that_does_not_fit_alone_fails_only_its_request(runner: FakeRunner) -> None:
    runner.fault = out_of_memory(above=4, even_alone=frozenset({"huge"}))
    observer = RecordingObserver()
    async with serving(runner, observer=observer, max_batch_size=4) as served:
        held = await served.hold(req(100, width=128))
        requests = [req(1), req(2, 3, prompt="huge", request_id="huge"), req(4)]
        first, huge, last = await served.submit_queued(*requests)
        runner.gate.set()
        assert_images_of(requests[0], await first)
        assert_images_of(requests[2], await last)
        with pytest.raises(EngineOutOfMemoryError, match="64x64 image did not fit, even alone"):
            await huge
        await held
    # The huge request's second image is not tried once its first failed alone.
    assert [seeds_of(batch) for batch in runner.batches[1:]] == [
        [1, 2, 3, 4],
        [1, 2],
        [1],
        [2],
        [4],
    ]
    assert observer.of("split") == [4, 2]
    assert len(observer.of("end")) == 2


async def test_a_request_withdrawn_between_tries_is_not_retried(runner: FakeRunner) -> None:
    runner.fault = out_of_memory(above=1)
    async with serving(runner, max_batch_size=4) as served:
        runner.gate.clear()  # the first call fails before its first step; the retry waits
        kept = served.submit(req(1))
        gone = served.submit(req(2))
        await until(lambda: len(runner.batches) == 2, "the first retry")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        runner.gate.set()
        assert_images_of(req(1), await kept)
    assert [seeds_of(batch) for batch in runner.batches] == [[1, 2], [1]]


class PreviewsThenRuns(FakeRunner):
    """Sends preview 0 of every request that asks for previews as soon as a call starts, so
    that a call that then runs out of memory has sent one (its retry sends it again)."""

    def run(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[list[Image.Image]]:
        if on_preview is not None:
            for position, request in enumerate(requests):
                if request.partial_images:
                    on_preview(position, 0, [])
        return super().run(requests, on_step, on_preview)


async def previews_of(
    stream: AsyncGenerator[EngineOutput, None],
) -> tuple[list[int], list[Image.Image]]:
    """The preview indices a stream sends, in order, and the images it ends with."""
    previews: list[int] = []
    async with contextlib.aclosing(stream):
        async for output in stream:
            if isinstance(output, PreviewImages):
                previews.append(output.index)
            elif isinstance(output, FinalImages):
                return previews, output.images
    raise AssertionError("the stream ended without images")


async def test_a_retried_request_sends_each_preview_once() -> None:
    runner = PreviewsThenRuns()
    runner.fault = out_of_memory(above=1)
    async with serving(runner, max_batch_size=4) as served:
        held = await served.hold(req(100, width=128))
        streamed = req(1, partial_images=1)
        with_previews = asyncio.create_task(previews_of(served.client.generate(streamed)))
        other = served.submit(req(2))
        await until(lambda: served.client.queued_images == 2, "the requests to queue")
        runner.gate.set()
        await held
        (previews, images), _ = await asyncio.gather(with_previews, other)
    assert [seeds_of(batch) for batch in runner.batches[1:]] == [[1, 2], [1], [2]]
    assert previews == [0]
    assert_images_of(streamed, images)


# Faults: a hung call


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
