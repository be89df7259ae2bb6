"""Engines and pipeline runners for tests.

Runners (`batching.PipelineRunner`, what `BatchingEngine` batches for):

- `FakeRunner` paints one small image per seed in `colour(seed)` and can hold a call at a
  gate; `req` builds requests for it.
- `DelegatingRunner` forwards to a real runner (the session's tiny diffusers runner) and never
  closes it; its subclasses change only `run`: `FailingRunner` fails on purpose,
  `ObservedRunner` holds and counts calls and steps, `FaultyRunner` injects faults (an
  exception, out of memory, a hang) inside the real pipeline call.

Engines (`ImageEngine`): `ScriptedEngine` queues by itself, as vllm-omni's engine does; the
test starts, finishes or fails each of its requests by hand.

`images_of` drains a stream to its images, for tests that do not look at the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import torch
from PIL import Image

from testing.shared_runner import SharedRunner
from vllm_omni_images.engine.base import (
    EngineOutput,
    EngineRequest,
    FinalImages,
    ImageEngine,
    ImagesStarted,
    Inbox,
    LoRAAdapter,
    ModelDefaults,
    ScaledAdapter,
)
from vllm_omni_images.engine.batching import PipelineRunner, PreviewCallback, StepCallback
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineDiedError,
    EngineError,
    EngineHungError,
    EngineOutOfMemoryError,
    GenerationCancelled,
)
from vllm_omni_images.engine.prompt_tokens import NO_TOKENIZER, PromptTokenCounter

from .waiting import ENGINE_WAIT_S, WAIT_S


async def images_of(stream: AsyncGenerator[EngineOutput, None]) -> list[Image.Image]:
    """The images a stream ends with (its other outputs are passed over)."""
    async with contextlib.aclosing(stream):
        async for output in stream:
            if isinstance(output, FinalImages):
                return output.images
    raise AssertionError("the stream ended without images")


def colour(seed: int) -> tuple[int, int, int]:
    """The colour `FakeRunner` paints the image of `seed`."""
    return (seed % 256, seed // 256 % 256, 99)


def req(*seeds: int, **fields: Any) -> EngineRequest:
    """A request of `FakeRunner`'s default size and steps, with one image per seed (default 1);
    `lora=adapter` (at `lora_scale=`, default 1) is a stack of that one adapter."""
    lora: LoRAAdapter | None = fields.pop("lora", None)
    lora_scale: float = fields.pop("lora_scale", 1.0)
    if lora is not None:
        fields["loras"] = (ScaledAdapter(lora, lora_scale),)
    values: dict[str, Any] = {
        "prompt": "a red fox",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        **fields,
    }
    return EngineRequest(seeds=seeds or (1,), **values)


class FakeClock:
    """A clock that moves only when a test (or `FakeRunner`) moves `now`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Records its calls (`batches`) and makes one 8x8 image per seed, coloured by the seed.

    Before each step it waits for `gate`, so a test holds a call mid-run by clearing it. A
    request with `partial_images` gets a preview (its images, grey) after each step but the
    last, when the call is given `on_preview`.
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
        self.closed = False
        self.adapters: list[LoRAAdapter] = []
        """The adapters added, in order (any adapter is accepted)."""

    @property
    def defaults(self) -> ModelDefaults:
        return ModelDefaults(width=64, height=64, num_inference_steps=2, size_multiple=8)

    @property
    def prompt_tokens(self) -> PromptTokenCounter:
        return NO_TOKENIZER

    def close(self) -> None:
        self.closed = True

    def add_lora(self, adapter: LoRAAdapter) -> None:
        self.adapters.append(adapter)

    def unavailable_adapters(self) -> frozenset[int]:
        return frozenset()

    def run(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
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
                if on_preview is not None and step < self.steps - 1:
                    for position, request in enumerate(requests):
                        if request.partial_images:
                            grey = [Image.new("RGB", (8, 8), (step, step, step))] * len(
                                request.seeds
                            )
                            on_preview(position, step, grey)
        except GenerationCancelled:
            self.finished.append("cancelled")
            raise
        self.finished.append("ok")
        return [[Image.new("RGB", (8, 8), colour(seed)) for seed in r.seeds] for r in requests]


class DelegatingRunner(SharedRunner):
    """A runner that forwards to `inner` and never closes it (the session-wide tiny runner,
    which every later test still uses after an app built on a wrapper shuts down); subclasses
    override what they change."""


class FailingRunner(DelegatingRunner):
    """The inner engine, except for the prompts "oom", "fail" and "bug", which fail as named."""

    def run(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[list[Image.Image]]:
        prompt = requests[0].prompt
        if prompt == "oom":
            raise EngineOutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        if prompt == "fail":
            raise EngineError("the VAE produced NaNs")
        if prompt == "bug":
            raise KeyError("unexpected")
        return super().run(requests, on_step, on_preview)


class ObservedRunner(DelegatingRunner):
    """The inner engine, holding each batch at `gate` and counting batches and steps."""

    def __init__(self, inner: PipelineRunner) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.batches: list[int] = []
        """The number of images of each batch, in order."""
        self.steps = 0

    def run(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[list[Image.Image]]:
        self.batches.append(sum(request.num_images for request in requests))
        self.started.set()
        self.gate.wait(ENGINE_WAIT_S)

        def counting(step: int, total: int) -> None:
            self.steps += 1
            if on_step is not None:
                on_step(step, total)

        return super().run(requests, counting, on_preview)


class FaultyRunner(DelegatingRunner):
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

    def __init__(self, inner: PipelineRunner, max_images: int | None = None) -> None:
        super().__init__(inner)
        self.max_images = max_images
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.calls: list[list[int]] = []

    def run(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[list[Image.Image]]:
        self.calls.append([seed for request in requests for seed in request.seeds])
        fault = self._fault(requests)

        def step(index: int, total: int) -> None:
            if index == 0 and fault is not None:
                fault()
            if on_step is not None:
                on_step(index, total)

        return super().run(requests, step, on_preview)

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
"""The longest `FaultyRunner` hangs when a test forgets to release it."""


class ScriptedRequest:
    """A request in `ScriptedEngine`: the test starts, finishes or fails it by hand."""

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.inbox = Inbox()
        self.aborted = False
        """Its stream was closed before its images."""
        self.left = asyncio.Event()
        """Its stream ended, whatever the way."""

    def start(self, images: int) -> None:
        self.inbox.put(ImagesStarted(images, self.request.num_images))

    def finish(self) -> None:
        images = [Image.new("RGB", (8, 8), colour(seed)) for seed in self.request.seeds]
        self.inbox.put(FinalImages(images))

    def fail(self, error: BaseException) -> None:
        self.inbox.put(error)


class ScriptedEngine(ImageEngine):
    """An engine with a queue of its own, as vllm-omni's: it keeps each request it is given
    (`requests`) for the test to start (`start(n)`), finish or fail."""

    def __init__(self) -> None:
        self.requests: list[ScriptedRequest] = []
        self.dead = False
        self.closed = False
        self.admissions = 0
        """How many times `check_admission` was asked."""

    @property
    def defaults(self) -> ModelDefaults:
        return ModelDefaults(width=64, height=64, num_inference_steps=2, size_multiple=16)

    def check_admission(self, num_images: int) -> None:
        self.admissions += 1
        self.check_health()

    def check_health(self) -> None:
        if self.dead:
            raise EngineDiedError("the scripted engine died")

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        scripted = ScriptedRequest(request)
        self.requests.append(scripted)
        try:
            async with contextlib.aclosing(scripted.inbox.outputs()) as outputs:
                async for output in outputs:
                    yield output
        except (asyncio.CancelledError, GeneratorExit):
            scripted.aborted = True
            raise
        finally:
            scripted.left.set()

    async def close(self) -> None:
        self.closed = True


def hung_error(engine: ImageEngine) -> EngineHungError | None:
    """The error `engine` answers while it is taken as hung; `None` while it is not."""
    try:
        engine.check_health()
    except EngineHungError as error:
        return error
    return None


def refuses_new_work(client: ImageEngineClient) -> bool:
    """Whether `client` is shutting down: it refuses new requests with a shutdown error."""
    try:
        client.check_admission(req(1))
    except EngineClosedError:
        return True
    return False
