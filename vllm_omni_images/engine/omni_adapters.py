"""`OmniAdapters`: the LoRA adapters an `OmniEngine` serves, each as vllm-omni's `LoRARequest`
over a checked PEFT copy (`lora_files.PeftCopies`). vllm-omni reads an adapter again from that
copy when its worker evicted it (`max_cpu_loras`), so a copy that went away is written again
from the adapter's own files before a request needs it.

vllm-omni applies one adapter per request: a stack of several is written as one adapter
(`lora_stacks.stack_weights`) with an id of its own, loaded, and kept per stack."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_omni_images.engine.base import (
    AdapterStack,
    LoRAAdapter,
    LoRASettings,
    StackKey,
    stack_key,
)
from vllm_omni_images.engine.errors import (
    EngineError,
    EngineRequestError,
    LoRAAdapterError,
    LoRAAdapterUnavailableError,
    LoRAStackError,
)
from vllm_omni_images.engine.lora_files import (
    PEFT_WEIGHTS,
    PeftCopies,
    meta_transformer,
    read_checked,
    served_pipeline,
    write_peft_folder,
)
from vllm_omni_images.engine.lora_stacks import stack_weights
from vllm_omni_images.engine.omni_flight import ScaledLoRA

if TYPE_CHECKING:
    from vllm_omni.lora.request import LoRARequest

logger = logging.getLogger(__name__)

LoadInWorkers = Callable[["LoRARequest", bool], Awaitable[None]]
"""Has vllm-omni's workers load a request's adapter (`True`: in place of the one of its id)."""

FIRST_STACK_ID = 2**30
"""Stacks' adapter ids count up from here, apart from vLLM's own, which count up from 1."""
LAST_STACK_ID = 2**31 - 1
"""Then they start again from `FIRST_STACK_ID` (vLLM's ids are int32)."""


class OmniAdapters:
    """The adapters added, by id, and those that cannot be used now (`unavailable`)."""

    def __init__(self, model_path: str, settings: LoRASettings) -> None:
        """Adapters of at most `settings.max_lora_rank`; `settings.cpu_slots` stacks kept
        written (least recently used deleted first)."""
        max_rank, max_stacks = settings.max_lora_rank, settings.cpu_slots
        from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

        self._model_path = model_path
        self._max_rank = max_rank
        self._copies = PeftCopies(model_path, max_rank)
        self._requests: dict[int, LoRARequest] = {}
        self.unavailable: frozenset[int] = frozenset()
        """Adapters whose copy and files could not be read when a request needed them;
        replaced whole, never changed in place, so that other threads may read it."""
        self.max_stack_rank = max(DiffusionLoRAManager._VALID_MAX_RANKS)
        """The largest rank vllm-omni's LoRA manager takes: a stack's summed rank is held to it."""
        self._max_stacks = max(1, max_stacks)
        self._stacks: OrderedDict[StackKey, LoRARequest] = OrderedDict()
        """Stacks written and loaded, least recently used first."""
        self._building: dict[StackKey, asyncio.Future[LoRARequest]] = {}
        """Stacks being written and loaded: the requests that need one meanwhile share it."""
        self._stack_ids = itertools.count(FIRST_STACK_ID)
        self._stack_folder: Path | None = None

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
        self._forget_stacks_of(adapter.adapter_id)  # loaded again in place: new weights

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

    async def lora_for(self, stack: AdapterStack, load: LoadInWorkers) -> ScaledLoRA | None:
        """vllm-omni's request for `stack` and the strength to apply it at (`None`: the base
        model): one adapter at its own strength (`request_for`), several as one adapter of
        their summed deltas at 1 (`stack_request`); `EngineRequestError` for an adapter never
        added."""
        if len(stack) > 1:
            return ScaledLoRA(await self.stack_request(stack, load), 1.0)
        if not stack:
            return None
        [scaled] = stack
        request = await self.request_for(scaled.adapter)
        if request is None:
            raise EngineRequestError(f"LoRA adapter '{scaled.adapter.name}' was never loaded.")
        return ScaledLoRA(request, scaled.scale)

    async def stack_request(self, stack: AdapterStack, load: LoadInWorkers) -> LoRARequest:
        """vllm-omni's request for one adapter whose delta is the sum of `stack`'s scaled
        deltas (applied at scale 1), written from the adapters' own files, loaded with `load`
        and kept per stack (`stack_key`); requests that need a stack while it is written wait
        for that one. A stack is written again once one of its adapters is loaded again in
        place, or its copy went away. Raises `LoRAAdapterUnavailableError` if an adapter's
        files cannot be read now, `LoRAStackError` (400) if the summed rank is above what
        vllm-omni takes, `EngineRequestError` for an adapter never added, and `EngineError` if
        vllm-omni cannot load the stack."""
        key = stack_key(stack)
        request = self._stacks.get(key)
        if request is not None:
            if (Path(request.lora_path) / PEFT_WEIGHTS).is_file():
                self._stacks.move_to_end(key)
                return request
            logger.warning("The copy for vllm-omni of a stack of LoRA adapters went away")
            self._forget_stack(key)
        building = self._building.get(key)
        if building is None:
            building = asyncio.ensure_future(self._build_stack(stack, load))
            self._building[key] = building
            building.add_done_callback(functools.partial(self._stack_built, key))
        # One waiting request that goes away leaves the build to the others.
        return await asyncio.shield(building)

    def remove(self) -> None:
        """Delete the copies (the engine is closed)."""
        self._copies.remove()
        if self._stack_folder is not None:
            shutil.rmtree(self._stack_folder, ignore_errors=True)

    async def _copy(self, adapter: LoRAAdapter) -> LoRARequest:
        from vllm_omni.lora.request import LoRARequest

        folder = await asyncio.to_thread(self._copies.write, adapter)
        return LoRARequest(
            lora_name=adapter.name, lora_int_id=adapter.adapter_id, lora_path=str(folder)
        )

    async def _build_stack(self, stack: AdapterStack, load: LoadInWorkers) -> LoRARequest:
        from vllm_omni.lora.request import LoRARequest

        for scaled in stack:
            if scaled.adapter.adapter_id not in self._requests:
                raise EngineRequestError(f"LoRA adapter '{scaled.adapter.name}' was never loaded.")
        stack_id = self._next_stack_id()
        if self._stack_folder is None:
            self._stack_folder = Path(tempfile.mkdtemp(prefix="vllm-omni-images-lora-stacks-"))
        folder = self._stack_folder / str(stack_id)
        try:
            await asyncio.to_thread(self._write_stack, stack, folder)
        except LoRAAdapterError as error:
            self.unavailable |= {
                s.adapter.adapter_id for s in stack if s.adapter.name == error.name
            }
            raise LoRAAdapterUnavailableError(error) from None
        self.unavailable -= {scaled.adapter.adapter_id for scaled in stack}
        names = "+".join(scaled.adapter.name for scaled in stack)
        request = LoRARequest(
            lora_name=f"stack-{stack_id}:{names}", lora_int_id=stack_id, lora_path=str(folder)
        )
        try:
            await load(request, False)
        except Exception as error:
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("vllm-omni could not load the stack of %s: %r", names, error)
            raise EngineError(
                f"vllm-omni could not load the LoRA adapters {_named(stack)} as one"
            ) from error
        return request

    def _write_stack(self, stack: AdapterStack, folder: Path) -> None:
        """Read and check each adapter of `stack`, then write their stack as a PEFT copy in
        `folder`;
        raises `LoRAAdapterError` naming an adapter that cannot be read, `LoRAStackError`
        for a summed rank above `max_stack_rank` (before anything is written)."""
        transformer = meta_transformer(self._model_path)
        pipeline = served_pipeline(self._model_path)
        parts = [
            (read_checked(scaled.adapter, self._max_rank, transformer, pipeline), scaled.scale)
            for scaled in stack
        ]
        weights = stack_weights(parts)
        if weights.rank > self.max_stack_rank:
            raise LoRAStackError(
                f"The LoRA adapters {_named(stack)} cannot be applied together on this "
                f"engine: vllm-omni applies them as one adapter of their summed rank, "
                f"{weights.rank}, above the {self.max_stack_rank} it takes. Name fewer or "
                "lower-rank adapters."
            )
        write_peft_folder(weights, folder)

    def _next_stack_id(self) -> int:
        stack_id = next(self._stack_ids)
        if stack_id > LAST_STACK_ID:
            self._stack_ids = itertools.count(FIRST_STACK_ID + 1)
            return FIRST_STACK_ID
        return stack_id

    def _stack_built(self, key: StackKey, building: asyncio.Future[LoRARequest]) -> None:
        """Keep a stack built (the least recently used one out, with its copy), unless one of
        its adapters was loaded again meanwhile (its copy then stays until `remove`, for the
        requests that got it)."""
        if self._building.get(key) is not building:
            return
        del self._building[key]
        if building.cancelled() or building.exception() is not None:
            return
        self._stacks[key] = building.result()
        while len(self._stacks) > self._max_stacks:
            self._forget_stack(next(iter(self._stacks)))

    def _forget_stack(self, key: StackKey) -> None:
        request = self._stacks.pop(key)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    def _forget_stacks_of(self, adapter_id: int) -> None:
        """Forget the stacks that hold `adapter_id`, written or being written."""
        for key in [key for key in self._stacks if adapter_id in dict(key)]:
            self._forget_stack(key)
        for key in [key for key in self._building if adapter_id in dict(key)]:
            del self._building[key]


def _named(stack: AdapterStack) -> str:
    return ", ".join(f"'{scaled.adapter.name}'" for scaled in stack)
