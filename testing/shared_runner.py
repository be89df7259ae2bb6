"""A pipeline runner shared by several batching engines in one process, never closed by them.

`BatchingEngine.close` closes its runner, as a server's engine should. Tests and benchmarks
build one engine after another on one loaded runner (the tiny model, loaded once); each wraps
it in `SharedRunner`, which forwards every call and leaves the runner open.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from vllm_omni_images.engine.base import EngineRequest, LoRAAdapter, ModelDefaults
from vllm_omni_images.engine.batching import PipelineRunner, PreviewCallback, StepCallback
from vllm_omni_images.engine.prompt_tokens import PromptTokenCounter


class SharedRunner:
    def __init__(self, inner: PipelineRunner) -> None:
        self.inner = inner

    @property
    def defaults(self) -> ModelDefaults:
        return self.inner.defaults

    @property
    def prompt_tokens(self) -> PromptTokenCounter:
        return self.inner.prompt_tokens

    def run(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[list[Image.Image]]:
        return self.inner.run(requests, on_step, on_preview)

    def add_lora(self, adapter: LoRAAdapter) -> None:
        self.inner.add_lora(adapter)

    def unavailable_adapters(self) -> frozenset[int]:
        return self.inner.unavailable_adapters()

    def close(self) -> None:
        return None  # the runner outlives this engine
