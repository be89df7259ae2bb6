"""`OmniAdapters`: the LoRA adapters an `OmniEngine` serves, each as vllm-omni's `LoRARequest`
over a checked PEFT copy (`lora_files.PeftCopies`). vllm-omni reads an adapter again from that
copy when its worker evicted it (`max_cpu_loras`), so a copy that went away is written again
from the adapter's own files before a request needs it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_omni_images.engine.base import AdapterStack, LoRAAdapter
from vllm_omni_images.engine.errors import LoRAAdapterError, LoRAAdapterUnavailableError
from vllm_omni_images.engine.lora_files import PEFT_WEIGHTS, PeftCopies

if TYPE_CHECKING:
    from vllm_omni.lora.request import LoRARequest

logger = logging.getLogger(__name__)

LoadInWorkers = Callable[["LoRARequest", bool], Awaitable[None]]
"""Has vllm-omni's workers load a request's adapter (`True`: in place of the one of its id)."""


class OmniAdapters:
    """The adapters added, by id, and those that cannot be used now (`unavailable`)."""

    def __init__(self, model_path: str, max_rank: int) -> None:
        self._copies = PeftCopies(model_path, max_rank)
        self._requests: dict[int, LoRARequest] = {}
        self.unavailable: frozenset[int] = frozenset()
        """Adapters whose copy and files could not be read when a request needed them;
        replaced whole, never changed in place, so that other threads may read it."""

    async def add(self, adapter: LoRAAdapter, load: LoadInWorkers) -> None:
        """Check and copy `adapter`, then `load` it; raise `LoRAAdapterError` if either fails."""
        request = await self._copy(adapter)
        try:
            await load(request, adapter.adapter_id in self._requests)
        except Exception as error:
            # Its message may quote the copy's contents: the log has it, the client a reason.
            logger.warning("vllm-omni could not load LoRA adapter %r: %r", adapter.name, error)
            raise LoRAAdapterError(adapter.name, "vllm-omni could not load it") from error
        self._requests[adapter.adapter_id] = request
        self.unavailable -= {adapter.adapter_id}

    async def request_for(self, adapter: LoRAAdapter) -> LoRARequest | None:
        """vllm-omni's request for `adapter` (`None`: never added), its copy written again if
        it went away; `LoRAAdapterUnavailableError` if its files cannot be served now."""
        request = self._requests.get(adapter.adapter_id)
        if request is None or (Path(request.lora_path) / PEFT_WEIGHTS).is_file():
            return request
        try:
            request = await self._copy(adapter)
        except LoRAAdapterError as error:
            self.unavailable |= {adapter.adapter_id}
            raise LoRAAdapterUnavailableError(error) from None
        logger.warning("LoRA adapter %r: its copy for vllm-omni was written again", adapter.name)
        self._requests[adapter.adapter_id] = request
        self.unavailable -= {adapter.adapter_id}
        return request

    async def stack_request(self, stack: AdapterStack, load: LoadInWorkers) -> LoRARequest:
        """vllm-omni's request for one adapter whose delta is the sum of `stack`'s scaled
        deltas, written, loaded and kept per stack; `LoRAAdapterUnavailableError` if one of
        its adapters cannot be read now."""
        raise NotImplementedError("stacks on the vllm-omni engine")

    def remove(self) -> None:
        """Delete the copies (the engine is closed)."""
        self._copies.remove()

    async def _copy(self, adapter: LoRAAdapter) -> LoRARequest:
        from vllm_omni.lora.request import LoRARequest

        folder = await asyncio.to_thread(self._copies.write, adapter)
        return LoRARequest(
            lora_name=adapter.name, lora_int_id=adapter.adapter_id, lora_path=str(folder)
        )
