"""`Flight`: one API request in the vllm-omni engine (`omni_engine.py`), its images' ids in
vllm-omni and their progress, kept on the caller's loop and on the engine's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from vllm_omni_images.engine.base import EngineRequest, Inbox, PreviewImages

if TYPE_CHECKING:
    from vllm_omni.lora.request import LoRARequest


@dataclass(frozen=True)
class ScaledLoRA:
    """vllm-omni's request for a request's adapters, and the strength to apply it at."""

    request: LoRARequest
    scale: float


@dataclass(eq=False)
class Flight:
    """One request handed to vllm-omni, one vllm-omni request per image (per try of it):
    what `OmniEngine` keeps of it on the caller's loop and on the engine's."""

    request: EngineRequest
    base_id: str
    lora: ScaledLoRA | None
    caller: asyncio.AbstractEventLoop
    request_ids: list[str] = field(init=False)
    """Each image's id in vllm-omni, of its current try."""
    # The caller's loop only:
    inbox: Inbox = field(default_factory=Inbox)
    job: asyncio.Future[list[Image.Image]] | None = None
    started: int = 0
    """Images that left vllm-omni's queue (a retry's start is not counted again)."""
    started_at: float | None = None
    previews: dict[int, dict[int, Image.Image]] = field(default_factory=dict)
    """Preview index -> its images in so far, by position (streaming output only)."""
    # The engine's loop only:
    aborted: bool = False
    """Images not yet handed to vllm-omni (or to be tried again) are not handed any more."""
    tasks: list[asyncio.Task[Image.Image]] = field(default_factory=list)
    running: set[int] = field(default_factory=set)
    """Images whose current try vllm-omni started and has not finished."""
    ever_started: set[int] = field(default_factory=set)
    """Images one of whose tries started: their `ImagesStarted` is sent."""

    def __post_init__(self) -> None:
        self.request_ids = [f"{self.base_id}-{i}" for i in range(self.num_images)]

    @property
    def num_images(self) -> int:
        return self.request.num_images

    def to_caller(self, callback: Callable[..., object], *args: Any) -> None:
        """Call `callback(*args)` on the caller's loop; nothing if that loop is gone."""
        with contextlib.suppress(RuntimeError):
            self.caller.call_soon_threadsafe(callback, *args)

    def add_preview(self, index: int, position: int, image: Image.Image) -> None:
        """Preview `index` of image `position` (caller's loop); once every image of the
        request has it, it goes to the stream as `PreviewImages`."""
        images = self.previews.setdefault(index, {})
        images[position] = image
        if len(images) == self.num_images:
            del self.previews[index]
            self.inbox.put(PreviewImages(index, [images[i] for i in range(self.num_images)]))
