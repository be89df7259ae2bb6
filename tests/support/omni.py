"""vllm-omni's real `DiffusionEngine` on CPU: a probe on its real worker, and a stand-in worker
for the faults the real one cannot be made to show.

`WorkerProbe` instruments vllm-omni's real in-process worker (the `uni` executor, on this
package's CPU platform): it records what each scheduling wave ran, and can hold the real
pipeline at its next denoising step or raise from it. Everything else is vllm-omni's own code.

`FakeDiffusionExecutor` replaces the executor (vllm-omni's own extension point,
`distributed_executor_backend`) for a worker process that dies, which an in-process worker
cannot do: it "denoises" each scheduled request into uniform noise drawn from the request's
seed, the way vllm-omni's model runner seeds a generator, and records what it was asked to run.

Importing this module imports vllm-omni (~20-40 s, once per test session).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from vllm.v1.engine.exceptions import EngineDeadError
from vllm_omni.diffusion.data import DiffusionOutput
from vllm_omni.diffusion.executor.abstract import DiffusionExecutor
from vllm_omni.diffusion.request import OmniDiffusionRequest
from vllm_omni.diffusion.sched.interface import DiffusionSchedulerOutput
from vllm_omni.diffusion.worker.utils import BatchRunnerOutput, RunnerOutput

from tests.support.batching import FLAG_DEFAULTS
from tests.support.engines import images_of, req
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.base import EngineObserver, EngineRequest, LoRASettings
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.omni_engine import OmniEngine
from vllm_omni_images.engine.omni_requests import build_omni_config


@dataclass(frozen=True)
class Wave:
    """One scheduling wave vllm-omni's engine ran: a whole batch in request mode, one
    denoising step of the running batch in step mode."""

    new: list[OmniDiffusionRequest]
    """The requests that joined in this wave."""
    running: int
    """The requests running in it, joined ones included."""


class WorkerProbe:
    """vllm-omni's real in-process worker, instrumented (see the module docstring).

    - `waves`: every scheduling wave, in order (cleared by the tests as they need);
    - `hold`: while cleared, the pipeline waits at its next denoising step, with `denoising`
      set; set by default;
    - `fail_with`: raised from the next denoising step, inside vllm-omni's pipeline and
      worker, then cleared;
    - `fits`: a model of the device's memory, asked at each denoising step with the requests
      of the wave (request mode: those that joined it): where it says no, the step raises
      `torch.OutOfMemoryError`, as a CUDA allocation would. `None` (the default): all fit;
    - `fault`: asked the same way; the exception it returns is raised from the step.
    """

    def __init__(self, engine: OmniEngine) -> None:
        diffusion_engine = engine.diffusion_engine
        worker = diffusion_engine.executor.driver_worker.worker  # the `uni` executor's
        self.pipeline = worker.model_runner.pipeline
        self.waves: list[Wave] = []
        self.hold = threading.Event()
        self.hold.set()
        self.denoising = threading.Event()
        self.fail_with: BaseException | None = None
        self.fits: Callable[[list[OmniDiffusionRequest]], bool] | None = None
        self.fault: Callable[[list[OmniDiffusionRequest]], BaseException | None] | None = None
        running: list[OmniDiffusionRequest] = []

        execute = diffusion_engine.execute_fn

        def record_wave(scheduler_output: DiffusionSchedulerOutput) -> Any:
            new = [data.req for data in scheduler_output.scheduled_new_reqs]
            self.waves.append(Wave(new, len(scheduler_output.scheduled_request_ids)))
            running[:] = new
            return execute(scheduler_output)

        diffusion_engine.execute_fn = record_wave
        transformer = self.pipeline.transformer
        forward = transformer.forward

        def denoise(*args: Any, **kwargs: Any) -> Any:
            self.denoising.set()
            try:
                if not self.hold.wait(ENGINE_WAIT_S):
                    raise TimeoutError("the test never released the worker")
            finally:
                self.denoising.clear()
            error, self.fail_with = self.fail_with, None
            if error is None and self.fits is not None and not self.fits(running):
                error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
            if error is None and self.fault is not None:
                error = self.fault(running)
            if error is not None:
                raise error
            return forward(*args, **kwargs)

        transformer.forward = denoise

    @property
    def batches(self) -> list[list[OmniDiffusionRequest]]:
        """The requests of each wave that started any (request mode: each batch)."""
        return [wave.new for wave in self.waves if wave.new]

    def reset(self) -> None:
        self.hold.set()
        self.fail_with = None
        self.fits = None
        self.fault = None
        self.waves.clear()


def noise_image(request: OmniDiffusionRequest) -> torch.Tensor:
    """What the fake worker "generates": a (1, 3, H, W) image in [-1, 1] (the VAE's range)
    from the request's generator, seeded as vllm-omni's model runner seeds it."""
    sampling = request.sampling_params
    generator = sampling.generator
    if generator is None:
        generator = torch.Generator(sampling.generator_device or "cpu").manual_seed(sampling.seed)
    assert isinstance(generator, torch.Generator)
    shape = (1, 3, sampling.height, sampling.width)
    return torch.rand(shape, generator=generator) * 2 - 1


@dataclass
class ExecutorScript:
    """How the fake worker behaves next; tests change it between requests."""

    fail_with: BaseException | None = None
    """Raised by the next forward pass (then cleared), as a worker's exception would be."""
    hold: threading.Event = field(default_factory=threading.Event)
    """While cleared, a forward pass waits (a request stays "running"); set by default."""

    def __post_init__(self) -> None:
        self.hold.set()


class FakeDiffusionExecutor(DiffusionExecutor):
    """A `DiffusionExecutor` whose forward pass is `noise_image`; see the module docstring."""

    def _init_executor(self) -> None:
        self.script = ExecutorScript()
        self.batches: list[list[OmniDiffusionRequest]] = []
        self.running = threading.Event()
        self._dead = False
        self._failure_callbacks: list[Callable[[], None]] = []

    @property
    def is_dead(self) -> bool:
        return self._dead

    def execute_batch(self, scheduler_output: DiffusionSchedulerOutput) -> BatchRunnerOutput:
        requests = [new.req for new in scheduler_output.scheduled_new_reqs]
        self.batches.append(requests)
        self.running.set()
        try:
            if not self.script.hold.wait(ENGINE_WAIT_S):
                raise TimeoutError("the test never released the fake worker")
        finally:
            self.running.clear()
        if self._dead:
            raise EngineDeadError("the fake diffusion worker died")
        error, self.script.fail_with = self.script.fail_with, None
        if error is not None:
            raise error
        return BatchRunnerOutput.from_list(
            [
                RunnerOutput(
                    request_id=request.request_id,
                    finished=True,
                    result=DiffusionOutput(output=noise_image(request)),
                )
                for request in requests
            ]
        )

    def execute_request(self, scheduler_output: DiffusionSchedulerOutput) -> BatchRunnerOutput:
        return self.execute_batch(scheduler_output)

    def execute_step(self, scheduler_output: DiffusionSchedulerOutput) -> BatchRunnerOutput:
        raise NotImplementedError("the fake worker runs whole requests only")

    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
        exec_all_ranks: bool = False,
    ) -> Any:
        return None if unique_reply_rank is not None else [None]

    def check_health(self) -> None:
        if self._dead:
            raise EngineDeadError("the fake diffusion worker died")

    def register_failure_callback(self, callback: Callable[[], None]) -> None:
        self._failure_callbacks.append(callback)

    def die(self) -> None:
        """What vllm-omni's worker monitor does when the worker process exits."""
        self._dead = True
        for callback in self._failure_callbacks:
            callback()
        self.script.hold.set()

    def shutdown(self) -> None:
        self.script.hold.set()


class FakeImagePipeline:
    """A pipeline class to register with vllm-omni's registry under a test-only name; never
    instantiated (the fake worker makes the images)."""

    supports_request_batch = True


SAME_IMAGE = 2
"""Largest pixel difference (of 255) between two runs of one image: the engines, alone and
batched, agree to within float rounding, not bit for bit."""


def build_engine(
    model_dir: Path,
    max_batch_size: int = 4,
    hang_grace_s: float = 60.0,
    lora: LoRASettings | None = None,
    *,
    batch_delay_ms: float = 0.0,
    observer: EngineObserver | None = None,
    **options: object,
) -> OmniEngine:
    config = build_omni_config(
        str(model_dir),
        options,
        max_batch_size=max_batch_size,
        batch_delay_ms=batch_delay_ms,
        lora=lora,
    )
    return OmniEngine(config, hang_grace_s=hang_grace_s, observer=observer, lora=lora)


def admitted(engine: OmniEngine) -> ImageEngineClient:
    """Admission in front of a module's shared engine (never closed: that would close it)."""
    return ImageEngineClient(engine, "tiny-qwen-image", FLAG_DEFAULTS.admission_config())


async def images_from(client: ImageEngineClient, request: EngineRequest) -> list[Image.Image]:
    """`request`'s images, through `client`."""
    return await images_of(client.generate(request))


def difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def batch_sizes(worker: WorkerProbe) -> list[int]:
    return [len(batch) for batch in worker.batches]


async def until_waiting_in_vllm_omni(engine: OmniEngine, count: int) -> None:
    """Wait until `count` requests wait in vllm-omni's own scheduler: admission counts a
    request as queued when it hands it over, a loop hop before vllm-omni has it."""
    await until(
        lambda: engine.diffusion_engine.scheduler.num_waiting_requests() == count,
        f"{count} requests waiting in vllm-omni",
        timeout_s=ENGINE_WAIT_S,
    )


async def until_vllm_omni_is_empty(engine: OmniEngine) -> None:
    """Wait until vllm-omni holds no request: every aborted one has left it."""
    await until(
        lambda: not engine.diffusion_engine.scheduler.has_requests(),
        "every request to leave vllm-omni",
        timeout_s=ENGINE_WAIT_S,
    )


async def start_blocker(client: ImageEngineClient, worker: WorkerProbe) -> asyncio.Task:
    """Hold the worker and occupy it with one request (seed 1000), so that later ones wait in
    vllm-omni."""
    worker.hold.clear()
    blocker = asyncio.create_task(images_of(client.generate(req(1000))))
    await until(worker.denoising.is_set, "the worker to start", timeout_s=ENGINE_WAIT_S)
    await until(lambda: client.running_images == 1, "admission to see it start")
    return blocker
