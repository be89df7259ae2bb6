"""vllm-omni's real `DiffusionEngine` on CPU, with a stand-in for the one part that needs a GPU.

vllm-omni's worker fails in `init_device` without a GPU. Everything around it is real: the
engine config read from the tiny model's `model_index.json`, vllm-omni's request scheduler and
its batching, abort, its Qwen-Image post-processing to PIL, close. `FakeDiffusionExecutor`
replaces only the executor (vllm-omni's own extension point, `distributed_executor_backend`):
it "denoises" each scheduled request into uniform noise drawn from the request's seed, the way
vllm-omni's model runner seeds a generator, and records what it was asked to run.

Importing this module imports vllm-omni (~20 s, once per test session).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.v1.engine.exceptions import EngineDeadError
from vllm_omni.diffusion.data import DiffusionOutput
from vllm_omni.diffusion.executor.abstract import DiffusionExecutor
from vllm_omni.diffusion.request import OmniDiffusionRequest
from vllm_omni.diffusion.sched.interface import DiffusionSchedulerOutput
from vllm_omni.diffusion.worker.utils import BatchRunnerOutput, RunnerOutput

from tests.support.waiting import ENGINE_WAIT_S


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
