"""Engines for tests: a fake one for the scheduler, and wrappers around the real tiny engine.

`FakeEngine` paints one small image per seed in `colour(seed)` and can hold a batch at a gate;
`req` builds requests for it. `DelegatingEngine` forwards to a real engine, and its subclasses
change only `generate`: to fail on purpose, or to hold and count batches and steps.
`FaultyEngine` injects faults (an exception, out of memory, a hang) inside the real engine's
pipeline call. `FakeQueueingEngine` queues by itself, as vllm-omni's engine does; the test
drives its jobs.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from vllm_omni_images.engine.base import (
    EngineRequest,
    ImageEngine,
    ImagesStarted,
    ModelDefaults,
    QueueingImageEngine,
    StepCallback,
)
from vllm_omni_images.engine.errors import (
    EngineDiedError,
    EngineError,
    EngineOutOfMemoryError,
    GenerationCancelled,
)

from .waiting import ENGINE_WAIT_S, WAIT_S


def colour(seed: int) -> tuple[int, int, int]:
    """The colour `FakeEngine` paints the image of `seed`."""
    return (seed % 256, seed // 256 % 256, 99)


def req(*seeds: int, **fields: Any) -> EngineRequest:
    """A request of `FakeEngine`'s default size and steps, with one image per seed (default 1)."""
    values: dict[str, Any] = {
        "prompt": "a red fox",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        **fields,
    }
    return EngineRequest(seeds=seeds or (1,), **values)


class FakeClock:
    """A clock that moves only when a test (or `FakeEngine`) moves `now`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine(ImageEngine):
    """Records its batches and makes one 8x8 image per seed, coloured by the seed.

    Before each step it waits for `gate`, so a test holds a batch mid-run by clearing it.
    """

    def __init__(self, steps: int = 2, clock: FakeClock | None = None) -> None:
        self.steps = steps
        self.clock = clock
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[EngineRequest]] = []
        self.steps_run: list[int] = []
        self.finished: list[str] = []
        self.fail_with: dict[str, BaseException] = {}
        """Raise this error for a batch whose first prompt is the key."""
        self.fault: Callable[[Sequence[EngineRequest]], None] | None = None
        """Called with each batch before it runs: it may raise (or block) to inject a fault."""

    @property
    def defaults(self) -> ModelDefaults:
        return ModelDefaults(width=64, height=64, num_inference_steps=2, size_multiple=8)

    def generate(
        self, requests: Sequence[EngineRequest], on_step: StepCallback | None = None
    ) -> list[list[Image.Image]]:
        self.batches.append(list(requests))
        self.steps_run.append(0)
        if requests[0].prompt in self.fail_with:
            self.finished.append("error")
            raise self.fail_with[requests[0].prompt]
        if self.fault is not None:
            try:
                self.fault(requests)
            except Exception:
                self.finished.append("error")
                raise
        try:
            for step in range(self.steps):
                assert self.gate.wait(WAIT_S), "the test never opened the gate"
                if self.clock is not None:
                    self.clock.now += 1.0
                self.steps_run[-1] += 1
                if on_step is not None:
                    on_step(step, self.steps)
        except GenerationCancelled:
            self.finished.append("cancelled")
            raise
        self.finished.append("ok")
        return [[Image.new("RGB", (8, 8), colour(seed)) for seed in r.seeds] for r in requests]


class DelegatingEngine(ImageEngine):
    """An engine that forwards to `inner`; subclasses override what they change.

    `close` does not close `inner`: the inner engine is the session-wide tiny engine, which
    every later test still uses after an app built on a wrapper shuts down.
    """

    def __init__(self, inner: ImageEngine) -> None:
        self.inner = inner

    @property
    def defaults(self) -> ModelDefaults:
        return self.inner.defaults

    def generate(
        self, requests: Sequence[EngineRequest], on_step: StepCallback | None = None
    ) -> list[list[Image.Image]]:
        return self.inner.generate(requests, on_step)

    def check_health(self) -> None:
        self.inner.check_health()


class FailingEngine(DelegatingEngine):
    """The inner engine, except for the prompts "oom", "fail" and "bug", which fail as named."""

    def generate(
        self, requests: Sequence[EngineRequest], on_step: StepCallback | None = None
    ) -> list[list[Image.Image]]:
        prompt = requests[0].prompt
        if prompt == "oom":
            raise EngineOutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        if prompt == "fail":
            raise EngineError("the VAE produced NaNs")
        if prompt == "bug":
            raise KeyError("unexpected")
        return super().generate(requests, on_step)


class ObservedEngine(DelegatingEngine):
    """The inner engine, holding each batch at `gate` and counting batches and steps."""

    def __init__(self, inner: ImageEngine) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.batches: list[int] = []
        """The number of images of each batch, in order."""
        self.steps = 0

    def generate(
        self, requests: Sequence[EngineRequest], on_step: StepCallback | None = None
    ) -> list[list[Image.Image]]:
        self.batches.append(sum(request.num_images for request in requests))
        self.started.set()
        self.gate.wait(ENGINE_WAIT_S)

        def counting(step: int, total: int) -> None:
            self.steps += 1
            if on_step is not None:
                on_step(step, total)

        return super().generate(requests, counting)


class FaultyEngine(DelegatingEngine):
    """The real engine with faults injected inside its pipeline call, at the end of the first
    denoising step, as a real fault would strike mid-call:

    - out of memory (`torch.OutOfMemoryError`, which the engine turns into
      `EngineOutOfMemoryError`) for a call of more than `max_images` images, or with an image
      whose prompt is `OOM_PROMPT` (it does not fit even alone);
    - a `RuntimeError` with a message, for a call with the prompt `FAIL_PROMPT`;
    - a hang, for a call with the prompt `HANG_PROMPT`: it blocks, deaf to cancellation, until
      the test sets `release` (`hanging` is set meanwhile).

    `calls` records the seeds of every call, in order.
    """

    OOM_PROMPT = "too big to fit"
    FAIL_PROMPT = "break the pipeline"
    HANG_PROMPT = "hang the engine"
    FAILURE = "the VAE produced NaNs"

    def __init__(self, inner: ImageEngine, max_images: int | None = None) -> None:
        super().__init__(inner)
        self.max_images = max_images
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.calls: list[list[int]] = []

    def generate(
        self, requests: Sequence[EngineRequest], on_step: StepCallback | None = None
    ) -> list[list[Image.Image]]:
        self.calls.append([seed for request in requests for seed in request.seeds])
        fault = self._fault(requests)

        def step(index: int, total: int) -> None:
            if index == 0 and fault is not None:
                fault()
            if on_step is not None:
                on_step(index, total)

        return super().generate(requests, step)

    def _fault(self, requests: Sequence[EngineRequest]) -> Callable[[], None] | None:
        prompts = {request.prompt for request in requests}
        images = sum(request.num_images for request in requests)
        if self.OOM_PROMPT in prompts or (self.max_images is not None and images > self.max_images):
            return self._out_of_memory
        if self.FAIL_PROMPT in prompts:
            return self._fail
        if self.HANG_PROMPT in prompts:
            return self._hang
        return None

    def _out_of_memory(self) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    def _fail(self) -> None:
        raise RuntimeError(self.FAILURE)

    def _hang(self) -> None:
        self.hanging.set()
        assert self.release.wait(HANG_LIMIT_S), "the test never released the hung engine"


HANG_LIMIT_S = 120.0
"""The longest `FaultyEngine` hangs when a test forgets to release it."""


class FakeJob:
    """A request in `FakeQueueingEngine`: the test starts and finishes it by hand."""

    def __init__(self, request: EngineRequest, on_started: ImagesStarted) -> None:
        self.request = request
        self.on_started = on_started
        self.future: concurrent.futures.Future[list[Image.Image]] = concurrent.futures.Future()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if not self.future.done():
            self.future.set_exception(GenerationCancelled())

    def finish(self) -> None:
        images = [Image.new("RGB", (8, 8), colour(seed)) for seed in self.request.seeds]
        self.future.set_result(images)


class FakeQueueingEngine(QueueingImageEngine):
    """An engine with a queue of its own, for the scheduler's hand-over mode: it keeps each
    submitted `FakeJob` for the test to start (`job.on_started(n)`) and finish."""

    name = "fake-queueing"

    def __init__(self) -> None:
        self.jobs: list[FakeJob] = []
        self.dead = False

    @property
    def defaults(self) -> ModelDefaults:
        return ModelDefaults(width=64, height=64, num_inference_steps=2, size_multiple=16)

    def submit(self, request: EngineRequest, on_started: ImagesStarted) -> FakeJob:
        if self.dead:
            raise EngineDiedError("the fake engine died")
        self.jobs.append(FakeJob(request, on_started))
        return self.jobs[-1]

    def close(self) -> None:
        for job in self.jobs:
            job.abort()
