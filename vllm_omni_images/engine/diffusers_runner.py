"""`DiffusersRunner`: the `PipelineRunner` over any diffusers pipeline, on CPU or GPU, one
blocking call per batch. Importable without vLLM."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vllm_omni_images.engine.base import (
    AdapterStack,
    EngineRequest,
    LoRAAdapter,
    LoRASettings,
    ModelDefaults,
    StackKey,
    stack_key,
)
from vllm_omni_images.engine.batch_planning import batch_key
from vllm_omni_images.engine.batching import PreviewCallback, StepCallback
from vllm_omni_images.engine.errors import (
    EngineError,
    EngineOutOfMemoryError,
    EngineRequestError,
    GenerationCancelled,
    LoRAAdapterError,
    LoRAAdapterUnavailableError,
)
from vllm_omni_images.engine.lora_files import AdapterWeights, diffusers_state_dict, read_checked
from vllm_omni_images.engine.model_folder import read_defaults
from vllm_omni_images.engine.previews import decode_previews, preview_steps, supports_previews
from vllm_omni_images.engine.prompt_tokens import PromptTokenCounter

logger = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # Half precision is what diffusion models are served in on GPUs; CPUs are fastest (and
    # exact) in float32.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


class DiffusersRunner:
    """Runs a `DiffusionPipeline`: one pipeline call per batch, one generator per image."""

    def __init__(
        self,
        model_path: str,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        *,
        pipeline: Any = None,
        trust_remote_code: bool = False,
        lora: LoRASettings | None = None,
    ) -> None:
        """Load the pipeline folder (or hub id) `model_path`, or serve `pipeline` under that
        name; with `lora`, it serves LoRA adapters."""
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.model_path = model_path
        if pipeline is None:
            from diffusers import DiffusionPipeline

            pipeline = DiffusionPipeline.from_pretrained(
                model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
            )
        self._pipe: Any = pipeline.to(self.device, self.dtype)
        self._pipe.set_progress_bar_config(disable=True)
        # The edit and inpaint pipelines of the same model, built on first use from the loaded
        # components (diffusers' `from_pipe`: no second copy of the weights).
        self._task_pipes: dict[str, Any] = {}
        self._lora = _LoRASlots(self._pipe, lora) if lora is not None else None
        self.prompt_tokens = PromptTokenCounter.of_pipeline(self._pipe)
        self._defaults = dataclasses.replace(
            read_defaults(self._pipe, model_path),
            supports_partial_images=supports_previews(self._pipe),
        )
        logger.info(
            "Loaded %s from %s on %s (%s); defaults %s",
            type(self._pipe).__name__,
            model_path,
            self.device,
            self.dtype,
            self._defaults,
        )

    @property
    def defaults(self) -> ModelDefaults:
        return self._defaults

    @property
    def pipeline(self) -> Any:
        return self._pipe

    def add_lora(self, adapter: LoRAAdapter) -> None:
        """Read and check `adapter` now (`LoRAAdapterError` if it cannot be served)."""
        if self._lora is None:
            raise LoRAAdapterError.not_enabled(adapter.name)
        self._lora.add(adapter)

    def unavailable_adapters(self) -> frozenset[int]:
        return frozenset() if self._lora is None else self._lora.unavailable

    def run(
        self,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[list[Image.Image]]:
        if not requests:
            return []
        first = requests[0]
        if self._lora is not None:
            self._lora.activate(first.loras)
        elif first.loras:
            raise EngineRequestError("LoRA is not enabled on this server.")
        pipe = self.pipeline_for(first.task)
        kwargs = self.pipeline_kwargs(pipe, requests, on_step, on_preview)
        try:
            with torch.inference_mode():
                images = pipe(**kwargs).images
        except GenerationCancelled:
            raise
        except (torch.OutOfMemoryError, MemoryError) as error:
            # The error's traceback holds the failed call's frames, and so its tensors: clear
            # them first, so that the memory is free for the batching engine's retry in halves.
            traceback.clear_frames(error.__traceback__)
            self._release_cached_memory()
            raise EngineOutOfMemoryError(str(error) or type(error).__name__) from error
        except Exception as error:
            raise EngineError(f"{type(error).__name__}: {error}") from error
        return [
            request.keep_unmasked(result)
            for request, result in zip(requests, split_per_request(requests, images), strict=True)
        ]

    def pipeline_for(self, task: str) -> Any:
        """The pipeline for `task` (`EngineRequest.task`), sharing the loaded components."""
        if task == "generate":
            return self._pipe
        if task not in self._task_pipes:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            auto = AutoPipelineForImage2Image if task == "edit" else AutoPipelineForInpainting
            try:
                pipe = auto.from_pipe(self._pipe)
            except (ValueError, KeyError) as error:
                raise EngineRequestError(
                    f"{type(self._pipe).__name__} has no {task} pipeline in diffusers, so "
                    f"this model cannot serve image {task}s ({error})."
                ) from error
            pipe.set_progress_bar_config(disable=True)
            self._task_pipes[task] = pipe
        return self._task_pipes[task]

    def pipeline_kwargs(
        self,
        pipe: Any,
        requests: Sequence[EngineRequest],
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> dict[str, Any]:
        """The arguments of `pipe`'s one call that serves `requests` (a compatible batch)."""
        call_params = frozenset(inspect.signature(pipe.__call__).parameters)
        first = requests[0]
        for request in requests[1:]:
            if batch_key(request) != batch_key(first):
                raise ValueError("requests of one batch must share size, steps and guidance")
        prompts = [r.prompt for r in requests for _ in r.seeds]
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "height": first.height,
            "width": first.width,
            "num_inference_steps": first.num_inference_steps,
            "num_images_per_prompt": 1,
            # One CPU generator per image: an image depends on its seed alone, not on the
            # batch it shares or the device's random number generator.
            "generator": [torch.Generator("cpu").manual_seed(s) for r in requests for s in r.seeds],
            "output_type": "pil",
        }
        if first.negative_prompt is not None:
            kwargs["negative_prompt"] = [r.negative_prompt for r in requests for _ in r.seeds]
        if first.image is not None:
            kwargs["image"] = [r.image for r in requests for _ in r.seeds]
        if first.mask is not None:
            kwargs["mask_image"] = [r.mask for r in requests for _ in r.seeds]
        if first.strength is not None:
            kwargs["strength"] = first.strength
        for knob in ("true_cfg_scale", "guidance_scale"):
            value = getattr(first, knob)
            if value is not None and knob in call_params:
                kwargs[knob] = value
        no_cfg_asked = first.negative_prompt is None and first.true_cfg_scale is None
        if no_cfg_asked and "true_cfg_scale" in call_params:
            # Without a negative prompt true CFG is off anyway; saying so keeps Qwen-Image's
            # default of 4.0 from logging a warning on every request.
            kwargs["true_cfg_scale"] = 1.0
        previews = preview_rows(requests) if on_preview and supports_previews(pipe) else []
        if (on_step is not None or previews) and "callback_on_step_end" in call_params:
            total = first.num_inference_steps

            def step_end(
                pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
            ) -> dict[str, Any]:
                if on_step is not None:
                    on_step(step, total)  # may stop the batch: before any preview work
                # An edit runs only part of the schedule; the pipeline knows how much.
                steps_run = getattr(pipe, "num_timesteps", None) or total
                for position, start, request in previews:
                    schedule = preview_steps(request.partial_images, steps_run)
                    if step in schedule and on_preview is not None:
                        rows = callback_kwargs["latents"][start : start + request.num_images]
                        images = decode_previews(pipe, rows, first.height, first.width)
                        on_preview(position, schedule.index(step), images)
                return callback_kwargs

            kwargs["callback_on_step_end"] = step_end
            if previews:
                kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        return kwargs

    def _release_cached_memory(self) -> None:
        gc.collect()  # tensors only cycles still hold, before the allocator's cache is emptied
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def close(self) -> None:
        self._pipe = None
        self._task_pipes.clear()
        self._lora = None
        self._release_cached_memory()


class _LoRASlots:
    """One pipeline's adapters: up to `max_loras` loaded and `max_cpu_loras` read, least
    recently used out; a batch runs one stack of them (diffusers' `set_adapters` with a
    weight each), or none. Engine thread only."""

    def __init__(self, pipe: Any, settings: LoRASettings) -> None:
        self._pipe = pipe
        self._settings = settings
        self._read: OrderedDict[int, tuple[LoRAAdapter, AdapterWeights]] = OrderedDict()
        self._loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._active: StackKey = ()
        self.unavailable: frozenset[int] = frozenset()
        """Adapters whose files could not be read again when a batch needed them; replaced
        whole, never changed in place, so that other threads may read it."""

    def add(self, adapter: LoRAAdapter) -> None:
        weights = self._read_checked(adapter)
        if adapter.adapter_id in self._loaded:  # loaded again in place: its weights changed
            self._unload(adapter.adapter_id)
        self._keep(adapter, weights)
        self.unavailable -= {adapter.adapter_id}

    def activate(self, stack: AdapterStack) -> None:
        """Apply `stack` (every adapter loaded, each at its strength); `()`: none."""
        if not stack:
            if self._active:
                self._pipe.disable_lora()
                self._active = ()
            return
        if len(stack) > self._settings.max_loras:  # mapping refuses these: a caller's bug
            raise ValueError(f"a stack of {len(stack)} adapters is over --max-loras")
        wanted = {scaled.adapter.adapter_id for scaled in stack}
        for scaled in stack:
            if scaled.adapter.adapter_id not in self._loaded:
                self._load(scaled.adapter, keep=wanted)
            self._loaded.move_to_end(scaled.adapter.adapter_id)
        if self._active == stack_key(stack):
            return
        self._pipe.enable_lora()
        self._pipe.set_adapters(
            [_peft_name(scaled.adapter) for scaled in stack],
            adapter_weights=[scaled.scale for scaled in stack],
        )
        self._active = stack_key(stack)

    def _read_checked(self, adapter: LoRAAdapter) -> AdapterWeights:
        transformer = getattr(self._pipe, "transformer", None)  # a UNet pipeline has none
        # The pipeline's class reads adapters in the layouts diffusers maps for it.
        return read_checked(adapter, self._settings.max_lora_rank, transformer, type(self._pipe))

    def _keep(self, adapter: LoRAAdapter, weights: AdapterWeights) -> None:
        self._read[adapter.adapter_id] = (adapter, weights)
        self._read.move_to_end(adapter.adapter_id)
        while len(self._read) > self._settings.cpu_slots:
            self._read.popitem(last=False)

    def _load(self, adapter: LoRAAdapter, keep: set[int]) -> None:
        """Load `adapter` into the model, unloading the least recently used adapters not in
        `keep` (the stack it joins) to make room."""
        kept = self._read.get(adapter.adapter_id)
        if kept is not None:
            weights = kept[1]
        else:  # evicted from host memory since it was added: read it again, as vLLM does
            try:
                weights = self._read_checked(adapter)
            except LoRAAdapterError as error:
                self.unavailable |= {adapter.adapter_id}
                raise LoRAAdapterUnavailableError(error) from None
            self.unavailable -= {adapter.adapter_id}
        self._keep(adapter, weights)
        while len(self._loaded) >= self._settings.max_loras:
            self._unload(next(i for i in self._loaded if i not in keep))
        with warnings.catch_warnings():
            # peft warns that a model with an adapter gets another: that is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self._pipe.load_lora_weights(
                diffusers_state_dict(weights), adapter_name=_peft_name(adapter)
            )
        self._loaded[adapter.adapter_id] = adapter
        logger.info("Loaded LoRA adapter '%s' into the model", adapter.name)

    def _unload(self, adapter_id: int) -> None:
        adapter = self._loaded.pop(adapter_id)
        self._pipe.delete_adapters(_peft_name(adapter))
        if any(active_id == adapter_id for active_id, _ in self._active):
            self._active = ()
            if self._loaded:  # the others stay loaded, and off until a batch names them
                self._pipe.disable_lora()


def _peft_name(adapter: LoRAAdapter) -> str:
    # By id: a name may be unloaded and loaded again for another file.
    return f"lora_{adapter.adapter_id}"


def preview_rows(requests: Sequence[EngineRequest]) -> list[tuple[int, int, EngineRequest]]:
    """(position, first row in the batch, request) of each request that asked for previews."""
    rows = []
    start = 0
    for position, request in enumerate(requests):
        if request.partial_images > 0:
            rows.append((position, start, request))
        start += request.num_images
    return rows


def split_per_request(
    requests: Sequence[EngineRequest], images: Sequence[Image.Image]
) -> list[list[Image.Image]]:
    expected = sum(r.num_images for r in requests)
    if len(images) != expected:
        raise EngineError(f"the pipeline returned {len(images)} images, expected {expected}")
    result: list[list[Image.Image]] = []
    start = 0
    for request in requests:
        result.append(list(images[start : start + request.num_images]))
        start += request.num_images
    return result
