"""The batching engine's faults within a batch: a request that breaks its call fails alone
(the others run again one by one), and out of memory is retried in halves (previews sent once).
Requests go through admission (`ImageEngineClient`), as in the server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Callable, Sequence

import pytest
from PIL import Image

from tests.support.batching import (
    RecordingObserver,
    assert_images_of,
    seeds_of,
    serving,
)
from tests.support.engines import FakeRunner, images_of, req
from tests.support.waiting import until
from vllm_omni_images.engine.base import EngineOutput, EngineRequest, FinalImages, PreviewImages
from vllm_omni_images.engine.batching import (
    PreviewCallback,
    StepCallback,
)
from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineError,
    EngineHungError,
    EngineOutOfMemoryError,
)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


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
