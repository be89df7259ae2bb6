"""`ImagesState`: what the Images API keeps on vLLM's app state, under one key (`images`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import State

from vllm_omni_images.images.limits import DEFAULT_LIMITS, ImageLimits

if TYPE_CHECKING:
    from vllm_omni_images.images.serving import OpenAIServingImage


@dataclass
class ImagesState:
    """Built once per app (`server.endpoint.build_images_state`), read by the routes."""

    limits: ImageLimits = DEFAULT_LIMITS
    serving: OpenAIServingImage | None = None
    """`None` where the engine is not an image engine: the routes answer vLLM's 501."""
    store_cleanup: asyncio.Task[Any] | None = None
    """The image store's expiry loop (held here: the event loop holds tasks only weakly)."""

    def close(self) -> None:
        """Stop the store's expiry loop."""
        if self.store_cleanup is not None:
            self.store_cleanup.cancel()


def images_state(state: State) -> ImagesState | None:
    """The app's `ImagesState`; `None` until the launcher or the endpoint plugin sets it."""
    images: ImagesState | None = getattr(state, "images", None)
    return images
