"""The small interface every image engine implements.

Everything above this module (scheduler, serving, HTTP) talks only to `ImageEngine`, so an
engine can be swapped by platform or model without touching a caller. Its exceptions are in
`errors.py`. This module must stay importable without vLLM: the GPU benchmarks run engines
where only diffusers is installed.
"""

from __future__ import annotations

import abc
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeAlias

from PIL import Image

DEFAULTS_FILE = "vllm_omni_images.json"
"""A model folder may hold this file: `ModelDefaults` fields that override what an engine reads
from the pipeline (sizes, steps), for the defaults a pipeline does not record itself."""


@dataclass(frozen=True)
class ModelDefaults:
    """What the served model produces when a request leaves a knob unset, and its limits."""

    width: int
    height: int
    num_inference_steps: int
    size_multiple: int
    true_cfg_scale: float | None = None
    guidance_scale: float | None = None
    max_pixels: int = 2048 * 2048
    min_steps: int = 1
    """Fewest denoising steps that give an image: 2 for a flow-matching scheduler with a
    terminal shift (Qwen-Image's), whose one-step schedule divides by zero (a black image)."""
    supports_partial_images: bool = False
    """Whether the engine can decode previews of intermediate steps (`EngineRequest.on_preview`)."""


PreviewSink = Callable[[int, list[Image.Image]], None]
"""Called with (preview index, the request's images at that step), on the engine's thread; it
must be cheap (hand the images over, encode elsewhere)."""


@dataclass(frozen=True)
class EngineRequest:
    """One request's work for the engine: `len(seeds)` images of one prompt.

    Every knob is resolved (no `None` for size or steps) before a request reaches an engine.
    Image `i` is generated from its own generator seeded with `seeds[i]`, so an image depends
    only on its own seed and parameters, never on which other requests share its batch.
    """

    prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    num_inference_steps: int
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    guidance_scale: float | None = None
    request_id: str = field(default="", compare=False)
    image: Image.Image | None = field(default=None, compare=False)
    """The image to start from (an edit or a variation), RGB; `None` to generate."""
    mask: Image.Image | None = field(default=None, compare=False)
    """With `image`: `L`, white where the image is to be changed (inpainting)."""
    strength: float | None = None
    """With `image`: how far from it the result may move (0-1); `None`: the pipeline's own."""
    partial_images: int = 0
    """Previews to decode from intermediate steps, evenly spaced (streaming)."""
    on_preview: PreviewSink | None = field(default=None, compare=False)
    """Where those previews go; called on the engine's thread."""

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def task(self) -> str:
        """`generate`, `edit` (image-to-image) or `inpaint` (edit within a mask)."""
        if self.image is None:
            return "generate"
        return "edit" if self.mask is None else "inpaint"


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


def batch_key(request: EngineRequest) -> BatchKey:
    """The request's batch key; prompts, negative prompt texts and seeds may differ."""
    return BatchKey(
        request.task,
        request.strength,
        request.width,
        request.height,
        request.num_inference_steps,
        request.true_cfg_scale,
        request.guidance_scale,
        request.negative_prompt is not None,
    )


StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (step index, total steps). It may raise
`errors.GenerationCancelled` to stop the batch at once."""


class ImageEngine(abc.ABC):
    """A loaded model that turns batches of `EngineRequest`s into images; the scheduler forms
    the batches.

    `generate` is blocking and is never called on the event loop; callers run it in a worker
    thread, one batch at a time per engine.
    """

    name: str = "engine"

    @property
    @abc.abstractmethod
    def defaults(self) -> ModelDefaults: ...

    @abc.abstractmethod
    def generate(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
    ) -> list[list[Image.Image]]:
        """Generate every request's images in one pipeline call.

        The requests of one call share size, steps and guidance settings (the scheduler
        groups them). Returns, per request and in order, its images in seed order.
        """

    def check_health(self) -> None:  # noqa: B027 - engines with nothing to check keep this
        """Raise if the engine can no longer serve."""

    def close(self) -> None:  # noqa: B027 - engines with nothing to release keep this
        """Release the model's memory."""


ImagesStarted = Callable[[int], None]
"""Called, from any thread, with a number of a request's images that just left the engine's
waiting queue and began to run."""


class EngineJob(Protocol):
    """One request submitted to a `QueueingImageEngine`."""

    @property
    def future(self) -> concurrent.futures.Future[list[Image.Image]]:
        """Settles once: the request's images in seed order, or the engine's exception."""
        ...

    def abort(self) -> None:
        """Withdraw the request: a waiting one leaves the engine's queue at once, a running
        one stops as soon as the engine allows. Its future then fails. Idempotent."""
        ...


class QueueingImageEngine(abc.ABC):
    """An engine that queues and batches requests itself, as vllm-omni's `DiffusionEngine` does.

    The scheduler above keeps admission (queue limit, timeouts, cancellation, metrics) and hands
    each accepted request over at once; the engine decides what runs together. Every method is
    thread-safe and none needs the caller's event loop.
    """

    name: str = "engine"

    @property
    @abc.abstractmethod
    def defaults(self) -> ModelDefaults: ...

    @abc.abstractmethod
    def submit(self, request: EngineRequest, on_started: ImagesStarted) -> EngineJob:
        """Queue `request`; raises at once (e.g. `EngineDiedError`) if it cannot be taken."""

    def check_health(self) -> None:  # noqa: B027 - engines with nothing to check keep this
        """Raise `errors.EngineDiedError` if the engine can no longer serve."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine and release the model's memory."""


AnyImageEngine: TypeAlias = ImageEngine | QueueingImageEngine
