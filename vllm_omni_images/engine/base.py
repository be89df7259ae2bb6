"""The one engine interface, `ImageEngine` (as vLLM's `EngineClient`), what it takes and
what it streams. Importable without vLLM."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeAlias

from PIL import Image

from vllm_omni_images.engine.errors import LoRAAdapterError
from vllm_omni_images.engine.prompt_tokens import NO_TOKENIZER, PromptTokenCounter

logger = logging.getLogger(__name__)

DEFAULTS_FILE = "vllm_omni_images.json"
"""A model folder's optional file of `ModelDefaults` fields, over what the pipeline records."""


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
    max_side: int | None = None
    """Widest and tallest image, in pixels, whose positions the model's transformer can
    encode (its position table, read from its config: `model_folder.max_side`); `None`:
    no bound but `max_pixels` (FLUX computes its positions for any size)."""
    min_steps: int = 1
    """Fewest denoising steps that give an image (2 where one step divides by zero)."""
    supports_partial_images: bool = False
    """Whether the engine streams previews of intermediate steps (`PreviewImages`)."""
    supports_strength: bool = True
    """Whether the served pipeline honours an edit's `strength`; where not, one is refused."""
    bytes_per_megapixel: float | None = None
    """The peak host memory one more megapixel in a pipeline call adds, measured on the CPU
    (`benchmarks/memory_admission.py`); `None`: not measured. Sets the default pixel budget
    (`memory_budget.resolve_pixel_budget`)."""


@dataclass(frozen=True)
class AdapterDefaults:
    """What a request naming an adapter gets for the knobs it leaves unset, in place of the
    model's (a distilled few-step adapter's steps and guidance); `None`: the model's."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None

    def given(self) -> dict[str, int | float]:
        """The fields set, by their request names."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


NO_ADAPTER_DEFAULTS = AdapterDefaults()


@dataclass(frozen=True)
class LoRAAdapter:
    """A LoRA adapter served under `name` (vLLM's `LoRARequest`, without vLLM): `path` is an
    adapter file or folder in a layout diffusers reads (`lora_files.py`); `adapter_id` is
    unique per name."""

    name: str
    adapter_id: int
    path: str
    defaults: AdapterDefaults = field(default=NO_ADAPTER_DEFAULTS, compare=False)
    """The operator's defaults for requests that name it (`--image-lora-defaults`)."""


@dataclass(frozen=True)
class ScaledAdapter:
    """One adapter of a request's stack, at its strength (0: none, 1: as trained)."""

    adapter: LoRAAdapter
    scale: float = 1.0


AdapterStack: TypeAlias = tuple[ScaledAdapter, ...]
"""A request's adapters, applied together (their deltas add up), in adapter-id order, each
adapter once; `()`: the base model."""

StackKey: TypeAlias = tuple[tuple[int, float], ...]
"""A stack as `(adapter_id, scale)` pairs: equal for stacks that make the same model."""


def adapter_stack(adapters: Iterable[ScaledAdapter]) -> AdapterStack:
    """`adapters` as a stack: sorted by id, so that a stack's order never changes its image;
    `ValueError` for an adapter listed twice."""
    stack = tuple(sorted(adapters, key=lambda scaled: scaled.adapter.adapter_id))
    ids = [scaled.adapter.adapter_id for scaled in stack]
    if len(set(ids)) != len(ids):
        raise ValueError("an adapter may be listed once per stack")
    return stack


def stack_key(stack: AdapterStack) -> StackKey:
    return tuple((scaled.adapter.adapter_id, scaled.scale) for scaled in stack)


@dataclass(frozen=True)
class LoRASettings:
    """`--enable-lora`'s limits, with vLLM's meanings."""

    max_loras: int = 1
    """Adapters loaded into the model at once (vLLM: per batch, on the device)."""
    max_cpu_loras: int | None = None
    """Adapters kept read in host memory, least recently used evicted (`None`: `max_loras`)."""
    max_lora_rank: int = 16
    """Adapters of a higher rank are refused when loaded."""

    @property
    def cpu_slots(self) -> int:
        return max(self.max_cpu_loras or self.max_loras, self.max_loras)


@dataclass(frozen=True)
class EngineRequest:
    """`len(seeds)` images of one prompt, every knob resolved; image `i` depends only on
    `seeds[i]` and the parameters, never on its batch."""

    prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    num_inference_steps: int
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    guidance_scale: float | None = None
    request_id: str = field(default="", compare=False)
    """For logs; a client's `X-Request-Id`, so it may repeat."""
    image: Image.Image | None = field(default=None, compare=False)
    """The image to start from (an edit or a variation), RGB; `None` to generate."""
    mask: Image.Image | None = field(default=None, compare=False)
    """With `image`: `L`, white where the image is to be changed (inpainting)."""
    strength: float | None = None
    """With `image`: how far from it the result may move (0-1); `None`: the pipeline's own."""
    partial_images: int = 0
    """Previews to stream from intermediate steps, evenly spaced (`PreviewImages`)."""
    loras: AdapterStack = ()
    """The adapters to apply together (`adapter_stack`); `()`: the base model."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("A request needs at least one seed.")
        object.__setattr__(self, "loras", adapter_stack(self.loras))

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def keep_unmasked(self, images: list[Image.Image]) -> list[Image.Image]:
        """`images` with the input's own pixels put back outside the mask (inpainting only):
        engines blend in latent space, and the VAE's round trip alters what the client kept."""
        if self.image is None or self.mask is None:
            return images
        kept = []
        for image in images:
            original = self.image.resize(image.size, Image.Resampling.LANCZOS)
            mask = self.mask.resize(image.size, Image.Resampling.BILINEAR)
            kept.append(Image.composite(image, original, mask))
        return kept

    @property
    def task(self) -> str:
        """`generate`, `edit` (image-to-image) or `inpaint` (edit within a mask)."""
        if self.image is None:
            return "generate"
        return "edit" if self.mask is None else "inpaint"


@dataclass(frozen=True)
class ImagesStarted:
    """`images` more of the request's images left the engine's queue and began to run."""

    images: int
    batch_images: int
    """Images running together with them, theirs included (as far as the engine knows)."""


@dataclass(frozen=True)
class PreviewImages:
    """Preview `index` (0-based) of the request's images, decoded from an intermediate step."""

    index: int
    images: list[Image.Image]


@dataclass(frozen=True)
class FinalImages:
    """The request's images, in seed order: the last output of its stream."""

    images: list[Image.Image]


EngineOutput: TypeAlias = ImagesStarted | PreviewImages | FinalImages

Message: TypeAlias = EngineOutput | BaseException
"""What a request's stream receives: an output, or the exception that ends it."""


class Inbox:
    """A request's stream inside an engine: `put` on the event loop; `outputs` yields up to
    the `FinalImages` and raises a message that is an exception."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Message] = asyncio.Queue()

    def put(self, message: Message) -> None:
        self._queue.put_nowait(message)

    async def outputs(self) -> AsyncGenerator[EngineOutput, None]:
        while True:
            message = await self._queue.get()
            if isinstance(message, BaseException):
                raise message
            yield message
            if isinstance(message, FinalImages):
                return


class ImageEngine(abc.ABC):
    """A served image model, as vLLM's `EngineClient` is a served text model.

    `generate` streams `ImagesStarted`, `PreviewImages` and one `FinalImages`, or raises an
    `errors.py` exception; the request is taken at the first iteration, and closing the stream
    (or cancelling its consumer) before `FinalImages` aborts it. `close` stops taking work.
    """

    prompt_tokens: PromptTokenCounter = NO_TOKENIZER
    """Counts a prompt's tokens as the model's text encoder reads them (a response's `usage`)."""
    max_pixels_in_flight: int | None = None
    """The engine's pixel budget (`memory_budget.py`): its calls, and the images it has in
    flight, hold at most this many pixels; `None`: no budget."""

    @property
    @abc.abstractmethod
    def defaults(self) -> ModelDefaults: ...

    def check_admission(self, num_images: int) -> None:  # noqa: B027 - accepts everything
        """Raise if a request of `num_images` images cannot be taken now (full, closed, hung)."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]: ...

    async def add_lora(self, adapter: LoRAAdapter) -> None:
        """Load `adapter` for requests that name it; raise `LoRAAdapterError` if it cannot be."""
        raise LoRAAdapterError.not_enabled(adapter.name)

    def unavailable_adapters(self) -> frozenset[int]:
        """The ids of adapters added earlier that cannot be used now (their requests fail
        with `LoRAAdapterUnavailableError`); callable from any thread."""
        return frozenset()

    def check_health(self) -> None:  # noqa: B027 - engines with nothing to check keep this
        """Raise `EngineDiedError` or `EngineHungError` if the engine cannot serve."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class EngineObserver(Protocol):
    """Where engines report what metrics show, with no-op defaults. `on_step` runs on an engine
    thread, every other hook on the event loop; all must be cheap."""

    def on_queue_depth(self, images: int) -> None:
        """Admission: the number of admitted images that have not started changed."""
        return None

    def on_running_images(self, images: int) -> None:
        """Admission: the number of started images of unanswered requests changed."""
        return None

    def on_requests(self, waiting: int, running: int) -> None:
        """Admission: the counts of admitted requests with no image / some image started changed."""
        return None

    def on_queue_wait(self, wait_s: float) -> None:
        """Admission: a request's first image started `wait_s` after it was admitted."""
        return None

    def on_batch_start(self, images: int) -> None:
        """An engine call of `images` images started."""
        return None

    def on_step(self, step_s: float) -> None:
        """A denoising step finished `step_s` after the previous one (or the call's start)."""
        return None

    def on_batch_end(self, engine_s: float) -> None:
        """An engine call (every out-of-memory retry included) ended after `engine_s`."""
        return None

    def on_batch_split(self, images: int) -> None:
        """An engine call of `images` images ran out of memory; its halves run next."""
        return None

    def on_batch_isolated(self, requests: int) -> None:
        """An engine call of `requests` requests failed (not out of memory, not the whole
        engine's failure); each request runs alone next."""
        return None

    def on_engine_hung(self, hung: bool) -> None:
        """The engine was taken as hung (`True`), or what hung it returned at last (`False`)."""
        return None


class NoObserver(EngineObserver):
    pass


_P = ParamSpec("_P")


def notify(hook: Callable[_P, None], *args: _P.args, **kwargs: _P.kwargs) -> None:
    """Call an `EngineObserver` hook; a failing hook is logged, never raised."""
    try:
        hook(*args, **kwargs)
    except Exception:
        logger.exception("Engine observer hook %s failed", getattr(hook, "__name__", hook))
