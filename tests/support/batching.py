"""A `BatchingEngine` over a `FakeRunner` behind admission (`ImageEngineClient`), as the server
puts them together, for the unit tests of batching and admission.

`serving(...)` starts one; the `Served` it yields submits requests in tasks of their own and
holds a first batch at the runner's gate, so that later requests wait in the queue.
`RecordingObserver` records what both report; `BrokenObserver` fails in every hook.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vllm_omni_images.engine.base import EngineObserver, EngineRequest
from vllm_omni_images.engine.batching import BatchingEngine
from vllm_omni_images.engine.client import AdmissionConfig, ImageEngineClient
from vllm_omni_images.server.cli_args import ImageTaskArgs

from .engines import FakeClock, FakeRunner, colour, images_of
from .waiting import WAIT_S, until

_ADMISSION_FIELDS = frozenset(field.name for field in dataclasses.fields(AdmissionConfig))
FLAG_DEFAULTS = ImageTaskArgs()
"""`vllm serve --task image`'s defaults, the start of the tests' admission and batching."""


@dataclass
class Served:
    client: ImageEngineClient
    engine: BatchingEngine
    runner: FakeRunner

    def submit(self, request: EngineRequest) -> asyncio.Task[list[Image.Image]]:
        """The request's images, asked for through admission, in a task of its own."""
        return asyncio.create_task(images_of(self.client.generate(request)))

    async def hold(self, blocker: EngineRequest) -> asyncio.Task[list[Image.Image]]:
        """Start `blocker` on a closed gate, so that later requests queue up behind it."""
        self.runner.gate.clear()
        task = self.submit(blocker)
        await until(lambda: len(self.runner.batches) == 1, "the blocker to start")
        return task

    async def submit_queued(
        self, *requests: EngineRequest
    ) -> list[asyncio.Task[list[Image.Image]]]:
        """Submit `requests` and wait until they are all admitted and waiting."""
        expected = self.client.queued_images + sum(request.num_images for request in requests)
        tasks = [self.submit(request) for request in requests]
        await until(lambda: self.client.queued_images == expected, "the requests to queue")
        return tasks


@contextlib.asynccontextmanager
async def serving(
    runner: FakeRunner | None = None,
    *,
    clock: Callable[[], float] | None = None,
    observer: EngineObserver | None = None,
    executor: concurrent.futures.Executor | None = None,
    **config: Any,
) -> AsyncIterator[Served]:
    """A batching engine over `runner` (a new `FakeRunner` if none) behind admission, both
    reporting to `observer` and reading `clock` (a `FakeClock` if none). `config` holds
    `AdmissionConfig` and `BatchingConfig` fields (the flags' defaults otherwise). Closed at the
    end with the gate open."""
    runner = runner or FakeRunner()
    clock = clock or FakeClock()
    admission = {name: value for name, value in config.items() if name in _ADMISSION_FIELDS}
    batching = {name: value for name, value in config.items() if name not in _ADMISSION_FIELDS}
    engine = BatchingEngine(
        runner,
        dataclasses.replace(FLAG_DEFAULTS.batching_config(), **batching),
        observer=observer,
        clock=clock,
        executor=executor,
    )
    client = ImageEngineClient(
        engine,
        "test-model",
        dataclasses.replace(FLAG_DEFAULTS.admission_config(), **admission),
        observer=observer,
        clock=clock,
    )
    try:
        async with asyncio.timeout(WAIT_S * 2):
            yield Served(client, engine, runner)
    finally:
        runner.gate.set()
        await client.close()


def seeds_of(batch: Sequence[EngineRequest]) -> list[int]:
    """The seeds of a batch's images, in order (what the runner was asked to make)."""
    return [seed for request in batch for seed in request.seeds]


def assert_images_of(request: EngineRequest, images: list[Image.Image] | BaseException) -> None:
    """`images` are `request`'s, in seed order (`FakeRunner` paints each in its seed's colour);
    an exception (from `gather(..., return_exceptions=True)`) fails the assertion."""
    assert isinstance(images, list), f"request {request.request_id} failed: {images!r}"
    assert [image.getpixel((0, 0)) for image in images] == [colour(s) for s in request.seeds]


class RecordingObserver(EngineObserver):
    """Records every hook's call as (kind, value); `of(kind)` lists one kind's values."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_queue_depth(self, images: int) -> None:
        self.events.append(("depth", images))

    def on_running_images(self, images: int) -> None:
        self.events.append(("running", images))

    def on_requests(self, waiting: int, running: int) -> None:
        self.events.append(("requests", (waiting, running)))

    def on_queue_wait(self, wait_s: float) -> None:
        self.events.append(("wait", wait_s))

    def on_batch_start(self, images: int) -> None:
        self.events.append(("start", images))

    def on_step(self, step_s: float) -> None:
        self.events.append(("step", step_s))

    def on_batch_end(self, engine_s: float) -> None:
        self.events.append(("end", engine_s))

    def on_batch_split(self, images: int) -> None:
        self.events.append(("split", images))

    def on_batch_isolated(self, requests: int) -> None:
        self.events.append(("isolated", requests))

    def on_engine_hung(self, hung: bool) -> None:
        self.events.append(("hung", hung))

    def of(self, kind: str) -> list[Any]:
        return [value for name, value in self.events if name == kind]


class BrokenObserver(EngineObserver):
    """Every hook raises, as a buggy metrics implementation would."""

    def on_queue_depth(self, images: int) -> None:
        raise RuntimeError("observer bug")

    def on_running_images(self, images: int) -> None:
        raise RuntimeError("observer bug")

    def on_queue_wait(self, wait_s: float) -> None:
        raise RuntimeError("observer bug")

    def on_batch_start(self, images: int) -> None:
        raise RuntimeError("observer bug")

    def on_step(self, step_s: float) -> None:
        raise RuntimeError("observer bug")

    def on_batch_end(self, engine_s: float) -> None:
        raise RuntimeError("observer bug")

    def on_batch_split(self, images: int) -> None:
        raise RuntimeError("observer bug")

    def on_batch_isolated(self, requests: int) -> None:
        raise RuntimeError("observer bug")

    def on_engine_hung(self, hung: bool) -> None:
        raise RuntimeError("observer bug")
