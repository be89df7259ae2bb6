"""The batching engine's planning of its engine calls: pure functions, no state, no clock."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeAlias

from vllm_omni_images.engine.base import EngineRequest, StackKey, stack_key


class BatchKey(NamedTuple):
    """What requests must share to run in one pipeline call."""

    task: str
    strength: float | None
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float | None
    guidance_scale: float | None
    has_negative_prompt: bool
    loras: StackKey


class _NoBatch(enum.Enum):
    YET = "no batch has run yet"


NO_BATCH_YET = _NoBatch.YET
AdapterTurn: TypeAlias = tuple[int, ...]
"""The adapters a batch applies, by id, whatever their strengths (`()`: the base model)."""
LastAdapter: TypeAlias = AdapterTurn | Literal[_NoBatch.YET]
"""The adapters of the last batch (`adapter_of`), or `NO_BATCH_YET`."""


def adapter_of(request: EngineRequest) -> AdapterTurn:
    """The ids of the request's adapters, its stack's turn; `()`: the base model."""
    return tuple(scaled.adapter.adapter_id for scaled in request.loras)


def batch_key(request: EngineRequest) -> BatchKey:
    """The request's batch key (one stack of adapters at its strengths); prompts and seeds may
    differ."""
    return BatchKey(
        request.task,
        request.strength,
        request.width,
        request.height,
        request.num_inference_steps,
        request.true_cfg_scale,
        request.guidance_scale,
        request.negative_prompt is not None,
        stack_key(request.loras),
    )


def batch_capacity(request: EngineRequest, max_images: int, max_pixels: int | None) -> int:
    """The most images a batch of `request`'s size holds: `max_images`, fewer where more would
    be over `max_pixels` (the engine's pixel budget; `None`: none), and at least one."""
    if max_pixels is None:
        return max_images
    return max(1, min(max_images, max_pixels // (request.width * request.height)))


def form_batch(
    queue: Sequence[EngineRequest],
    max_images: int,
    last_adapter: LastAdapter = NO_BATCH_YET,
    max_pixels: int | None = None,
) -> list[int]:
    """Indices into `queue` (oldest first) of the next batch, its leader first: the oldest
    request, or the oldest of another stack of adapters than `last_adapter`'s; then requests of the
    leader's batch key, in order, that fit within `max_images` and `max_pixels` (one that does
    not is skipped). The leader alone may be over either: it runs alone."""
    if not queue:
        return []
    lead = 0
    if adapter_of(queue[0]) == last_adapter:
        lead = next((i for i, r in enumerate(queue) if adapter_of(r) != last_adapter), 0)
    key = batch_key(queue[lead])
    capacity = batch_capacity(queue[lead], max_images, max_pixels)
    chosen = [lead]
    total = queue[lead].num_images
    for index in range(len(queue)):
        if index == lead:
            continue
        if total >= capacity:
            break
        request = queue[index]
        if total + request.num_images <= capacity and batch_key(request) == key:
            chosen.append(index)
            total += request.num_images
    return chosen


@dataclass(frozen=True)
class BatchSlice:
    """Images `start` to `stop` (indices into its seeds) of request `index` of a batch."""

    index: int
    start: int
    stop: int

    @property
    def num_images(self) -> int:
        return self.stop - self.start


def split_in_halves(slices: Sequence[BatchSlice]) -> tuple[list[BatchSlice], list[BatchSlice]]:
    """The first (larger) and second half of the slices' images, in order, a request split at
    the middle if it straddles it; `ValueError` for a single image."""
    total = sum(part.num_images for part in slices)
    if total < 2:
        raise ValueError("a single image cannot be split")
    middle = (total + 1) // 2
    first: list[BatchSlice] = []
    second: list[BatchSlice] = []
    seen = 0
    for part in slices:
        if seen + part.num_images <= middle:
            first.append(part)
        elif seen >= middle:
            second.append(part)
        else:
            cut = part.start + middle - seen
            first.append(BatchSlice(part.index, part.start, cut))
            second.append(BatchSlice(part.index, cut, part.stop))
        seen += part.num_images
    return first, second


def company_wait_s(
    batch_images: int, max_images: int, head_arrival: float, now: float, delay_s: float
) -> float:
    """How much longer a batch waits for company: `delay_s` from its head's arrival; 0 if full."""
    if batch_images >= max_images:
        return 0.0
    return max(0.0, head_arrival + delay_s - now)
