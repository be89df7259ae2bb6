"""The object vLLM's server keeps as `app.state.engine_client` for the image task.

vLLM's core routes and its server loop ask it for `check_health()`, `errored`,
`is_running` and `do_log_stats()`; our serving layer asks it for images. Generation runs on
one dedicated thread, never on the event loop, one pipeline call at a time.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image
from vllm.v1.engine.exceptions import EngineDeadError

from vllm_omni_images.engine import EngineRequest, ImageEngine, ModelDefaults


class EngineNotReadyError(RuntimeError):
    """The model is not loaded (yet, or any more)."""


@dataclass(frozen=True)
class ShutdownConfig:
    """The one field of `VllmConfig` that vLLM's `serve_http` reads from an engine client."""

    shutdown_timeout: int = 0


class ImageEngineClient:
    def __init__(
        self, engine: ImageEngine | None, model_name: str, shutdown_timeout: int = 0
    ) -> None:
        self.model_name = model_name
        self.vllm_config = ShutdownConfig(shutdown_timeout)
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-engine")

    @property
    def engine(self) -> ImageEngine:
        if self._engine is None:
            raise EngineNotReadyError(f"The model `{self.model_name}` is not loaded.")
        return self._engine

    @property
    def is_ready(self) -> bool:
        return self._engine is not None

    @property
    def defaults(self) -> ModelDefaults:
        return self.engine.defaults

    # vLLM's server loop shuts the server down when `errored and not is_running`; an image
    # engine error fails one request, never the server.
    @property
    def errored(self) -> bool:
        return False

    @property
    def is_running(self) -> bool:
        return self.is_ready

    async def check_health(self) -> None:
        if self._engine is None:
            raise EngineDeadError()
        self._engine.check_health()

    async def do_log_stats(self) -> None:
        return None

    async def generate(self, request: EngineRequest) -> list[Image.Image]:
        engine = self.engine
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, engine.generate, [request])
        return results[0]

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking work and free the model. Work already running finishes first (it
        cannot be interrupted mid-step); queued work is dropped unless a drain `timeout`
        is given."""
        self._executor.shutdown(wait=True, cancel_futures=not timeout)
        if self._engine is not None:
            self._engine.close()
            self._engine = None
