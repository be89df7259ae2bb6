"""Which of the omni engine's images vllm-omni ran together (`WaveLog`, written by vllm-omni's
own scheduler, `recording_scheduler`), and how a wave that failed is retried: out of memory in
halves (`retry_halves`), otherwise request by request (`retry_alone`), each group with a key of
its own (`retry_key`). vllm-omni is imported inside; docs/architecture.md, "Faults"."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from vllm_omni_images.engine.batch_planning import BatchSlice, split_in_halves
from vllm_omni_images.engine.errors import EngineOutOfMemoryError, may_be_one_requests

if TYPE_CHECKING:
    from vllm_omni.diffusion.data import OmniDiffusionConfig
    from vllm_omni.diffusion.sched import BaseScheduler

RETRY_KEY_TAG = "vllm_omni_images.retry"

Owner = TypeVar("Owner", bound=Hashable)
"""The API request an image (a vllm-omni request) belongs to."""


class TryOutcome(enum.Enum):
    """How one try of one image in vllm-omni ended."""

    ENDED = "ended"
    """With its image, or with an error that is not retried (or it moved on to a later wave)."""
    OUT_OF_MEMORY = "out_of_memory"
    FAILED = "failed"
    """With an error that may be one request's (`errors.may_be_one_requests`)."""


def try_outcome(error: BaseException) -> TryOutcome:
    """How a try that raised `error` ended."""
    if isinstance(error, EngineOutOfMemoryError):
        return TryOutcome.OUT_OF_MEMORY
    return TryOutcome.FAILED if may_be_one_requests(error) else TryOutcome.ENDED


@dataclass(eq=False)
class ScheduledWave(Generic[Owner]):
    """Requests vllm-omni's scheduler ran together: one executor call (request batching) or
    one denoising step (`--step-execution`). Their outcomes are reported under `WaveLog`'s lock."""

    request_ids: tuple[str, ...]
    """All of them, in the scheduler's order."""
    unreported: set[str]
    """The watched ones whose outcome is not reported yet (and which did not move on)."""
    owners: dict[str, Owner] = field(default_factory=dict)
    """The reported ones' API requests."""
    out_of_memory: list[str] = field(default_factory=list)
    """The watched ones reported out of memory."""
    failed: list[str] = field(default_factory=list)
    """The watched ones reported `FAILED`."""

    def report(self, request_id: str, outcome: TryOutcome, owner: Owner | None = None) -> bool:
        """Record `request_id`'s outcome; true when it was the last one missing."""
        if request_id not in self.unreported:
            return False
        self.unreported.discard(request_id)
        if owner is not None:
            self.owners[request_id] = owner
        if outcome is TryOutcome.OUT_OF_MEMORY:
            self.out_of_memory.append(request_id)
        elif outcome is TryOutcome.FAILED:
            self.failed.append(request_id)
        return not self.unreported

    @property
    def retries(self) -> bool:
        """Whether any of its requests waits to know how it is tried again."""
        return bool(self.out_of_memory or self.failed)


class WaveLog(Generic[Owner]):
    """The wave each watched request ran in last: `record` is called by vllm-omni's scheduler on
    its busy thread, the rest on the engine's loop. A wave with requests to retry goes to
    `settled` (on either thread) once every watched request of it ended or moved on to a later
    wave (step batching: a request that a failure in its wave spared runs on)."""

    def __init__(self, settled: Callable[[ScheduledWave[Owner]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._waves: dict[str, ScheduledWave[Owner] | None] = {}
        self.settled = settled

    def watch(self, request_id: str) -> None:
        """Record the waves `request_id` runs in, until `end`."""
        with self._lock:
            self._waves[request_id] = None

    def record(self, request_ids: Sequence[str]) -> None:
        """vllm-omni scheduled `request_ids` together; a watched one is reported to this wave."""
        settled = []
        with self._lock:
            watched = {request_id for request_id in request_ids if request_id in self._waves}
            if not watched:
                return
            wave: ScheduledWave[Owner] = ScheduledWave(tuple(request_ids), watched)
            for request_id in watched:
                last = self._waves[request_id]
                if last is not None and last.report(request_id, TryOutcome.ENDED) and last.retries:
                    settled.append(last)
                self._waves[request_id] = wave
        for last in settled:
            self._settle(last)

    def end(
        self, request_id: str, outcome: TryOutcome, owner: Owner
    ) -> ScheduledWave[Owner] | None:
        """Stop watching `request_id` and report its outcome to the wave it ran in last: that
        wave, `None` if it never ran."""
        with self._lock:
            wave = self._waves.pop(request_id, None)
            complete = wave is not None and wave.report(request_id, outcome, owner)
        if wave is not None and complete and wave.retries:
            self._settle(wave)
        return wave

    def _settle(self, wave: ScheduledWave[Owner]) -> None:
        if self.settled is not None:
            self.settled(wave)

    def __len__(self) -> int:
        return len(self._waves)


def retry_halves(wave: ScheduledWave[Any]) -> list[tuple[str, ...]]:
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


def retry_alone(wave: ScheduledWave[Any]) -> list[tuple[str, ...]]:
    """The groups a wave's `FAILED` requests are retried in, one after the other: each API
    request's images by themselves, in the wave's order; none when they are one API request's
    (it failed alone already: nothing else failed with it)."""
    groups: dict[Hashable, list[str]] = {}
    for request_id in sorted(wave.failed, key=wave.request_ids.index):
        groups.setdefault(wave.owners[request_id], []).append(request_id)
    return [tuple(group) for group in groups.values()] if len(groups) > 1 else []


def retry_key(group: Sequence[str]) -> tuple[str, str]:
    """vllm-omni's `batch_compatibility_key` for a group's requests: theirs alone, so that the
    group never joins other requests, and runs at most as large as it is."""
    return (RETRY_KEY_TAG, group[0])


def recording_scheduler(config: OmniDiffusionConfig, log: WaveLog[Any]) -> BaseScheduler:
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
