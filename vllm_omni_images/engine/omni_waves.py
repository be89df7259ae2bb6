"""Which of the omni engine's images vllm-omni ran together (`WaveLog`, written by vllm-omni's
own scheduler, `recording_scheduler`), and how a wave that ran out of memory is retried
(`retry_halves`, `retry_key`). vllm-omni is imported inside; docs/architecture.md, "Faults"."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm_omni_images.engine.batch_planning import BatchSlice, split_in_halves

if TYPE_CHECKING:
    from vllm_omni.diffusion.data import OmniDiffusionConfig
    from vllm_omni.diffusion.sched import BaseScheduler

RETRY_KEY_TAG = "vllm_omni_images.out_of_memory_half"


@dataclass(eq=False)
class ScheduledWave:
    """Requests vllm-omni's scheduler ran together: one executor call (request batching) or
    one denoising step (`--step-execution`). Its outcomes are reported on the engine's loop."""

    request_ids: tuple[str, ...]
    """All of them, in the scheduler's order."""
    unreported: set[str]
    """The watched ones whose outcome is not reported yet."""
    out_of_memory: list[str] = field(default_factory=list)
    """The watched ones reported out of memory."""

    def report(self, request_id: str, out_of_memory: bool) -> bool:
        """Record `request_id`'s outcome; true when it was the last one missing."""
        if request_id not in self.unreported:
            return False
        self.unreported.discard(request_id)
        if out_of_memory:
            self.out_of_memory.append(request_id)
        return not self.unreported


class WaveLog:
    """The wave each watched request ran in last: `record` is called by vllm-omni's scheduler on
    its busy thread, the rest on the engine's loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waves: dict[str, ScheduledWave | None] = {}

    def watch(self, request_id: str) -> None:
        """Record the waves `request_id` runs in, until `forget`."""
        with self._lock:
            self._waves[request_id] = None

    def record(self, request_ids: Sequence[str]) -> None:
        """vllm-omni scheduled `request_ids` together; a watched one is reported to this wave."""
        with self._lock:
            watched = {request_id for request_id in request_ids if request_id in self._waves}
            if not watched:
                return
            wave = ScheduledWave(tuple(request_ids), watched)
            for request_id in watched:
                self._waves[request_id] = wave

    def forget(self, request_id: str) -> ScheduledWave | None:
        """Stop watching `request_id`: the wave it ran in last, `None` if it never ran."""
        with self._lock:
            return self._waves.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._waves)


def retry_halves(wave: ScheduledWave) -> list[tuple[str, ...]]:
    """The groups a wave's out-of-memory requests are retried in, one after the other: the
    halves of them in the wave's order (the larger first), as the diffusers engine splits a
    batch; none when the wave ran one image, which then did not fit even alone."""
    if len(wave.request_ids) < 2 or not wave.out_of_memory:
        return []
    failed = sorted(wave.out_of_memory, key=wave.request_ids.index)
    if len(failed) == 1:  # the others were withdrawn: it runs alone now
        return [tuple(failed)]
    halves = split_in_halves([BatchSlice(position, 0, 1) for position in range(len(failed))])
    return [tuple(failed[part.index] for part in half) for half in halves]


def retry_key(half: Sequence[str]) -> tuple[str, str]:
    """vllm-omni's `batch_compatibility_key` for a half's requests: theirs alone, so that the
    half never joins other requests, and runs at most as large as it is."""
    return (RETRY_KEY_TAG, half[0])


def recording_scheduler(config: OmniDiffusionConfig, log: WaveLog) -> BaseScheduler:
    """The scheduler vllm-omni picks for `config` (request batching, or step batching with
    `step_execution`), which records each wave it schedules in `log` (its only change)."""
    from vllm_omni.diffusion.sched import RequestScheduler, StepScheduler

    def recorded(output: Any) -> Any:
        if request_ids := output.scheduled_request_ids:
            log.record(request_ids)
        return output

    class WaveRecordingRequestScheduler(RequestScheduler):
        def schedule(self) -> Any:
            return recorded(super().schedule())

    class WaveRecordingStepScheduler(StepScheduler):
        def schedule(self) -> Any:
            return recorded(super().schedule())

    # vllm-omni's own choice (DiffusionEngine._resolve_execution_mode): streaming output
    # implies step execution.
    if config.step_execution or config.streaming_output:
        return WaveRecordingStepScheduler()
    return WaveRecordingRequestScheduler()
