"""The mapping onto vllm-omni's types: its engine config, one `OmniDiffusionRequest` per image,
what it cannot do, and its failures as this project's errors. vllm-omni is imported inside."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch

from vllm_omni_images.engine.base import EngineRequest, LoRASettings, ModelDefaults
from vllm_omni_images.engine.errors import (
    EngineDiedError,
    EngineError,
    EngineOutOfMemoryError,
    EngineRequestError,
)

if TYPE_CHECKING:
    from vllm_omni.diffusion.data import OmniDiffusionConfig
    from vllm_omni.diffusion.request import OmniDiffusionRequest

    from vllm_omni_images.engine.omni_flight import ScaledLoRA

logger = logging.getLogger(__name__)

PARTIAL_IMAGES_ARG = "partial_images"
"""The sampling `extra_args` key of a request's previews, read by `pipelines/step_previews.py`."""
PREVIEW_PIPELINES = "vllm_omni_images.pipelines.step_previews"
"""The module whose `<module>.<pipeline class name>` is that pipeline with previews, as
vllm-omni's `custom_pipeline_args["pipeline_class"]` of an engine with streaming output."""

STRENGTH_FLAG = "support_strength"
"""The pipeline class attribute that declares it reads `sampling_params.strength` (as vllm-omni's
`support_image_input` declares an input image); this package's pipelines set it."""

VLLM_OMNI_STRENGTH_PIPELINES = frozenset(
    {
        "vllm_omni.diffusion.models.flux2_klein.pipeline_flux2_klein.Flux2KleinPipeline",
        "vllm_omni.diffusion.models.z_image.pipeline_z_image.ZImagePipeline",
    }
)
"""vllm-omni's own pipeline classes whose `forward` reads `sampling_params.strength` (read in
vllm-omni 0.30's sources; they declare nothing). Qwen-Image-Edit's, for one, never reads it."""


def build_omni_config(
    model_path: str,
    options: Mapping[str, Any],
    *,
    max_batch_size: int = 1,
    batch_delay_ms: float = 0.0,
    lora: LoRASettings | None = None,
) -> OmniDiffusionConfig:
    """vllm-omni's engine config for `model_path`, as `vllm serve --omni` builds it: `options`
    are its config fields by vllm-omni's names, batching and the adapter cache ours."""
    from vllm_omni.diffusion.data import DiffusionParallelConfig, OmniDiffusionConfig
    from vllm_omni.diffusion.diffusion_engine import supports_request_batch
    from vllm_omni.platforms import current_omni_platform
    from vllm_omni.plugins import load_omni_general_plugins

    # This package's pipelines (`pipelines/`) replace vllm-omni's in its registry through its
    # general-plugin entry point, which vllm-omni's workers load themselves; this process too.
    load_omni_general_plugins()

    if current_omni_platform.device_type == "cpu" and "dtype" not in options:
        # vllm-omni's default, bfloat16, meets vLLM's CPU matmul with float32 inputs; the
        # diffusers engine runs float32 on the CPU too, so the two engines agree.
        options = {**options, "dtype": torch.float32}
    if lora is not None:
        options = {**options, "max_cpu_loras": lora.cpu_slots}
    # Sizes go to the parallel config (which picks its own fields), the rest to the top level.
    parallel = DiffusionParallelConfig.from_stage_overrides(options)
    parallel_fields = {f.name for f in fields(DiffusionParallelConfig)}
    config = OmniDiffusionConfig.from_kwargs(
        model=model_path,
        parallel_config=parallel,
        num_gpus=parallel.world_size,
        max_num_seqs=max_batch_size,
        request_batch_max_wait_ms=batch_delay_ms,
        **{name: value for name, value in options.items() if name not in parallel_fields},
    )
    config.enrich_config()  # reads model_index.json: the pipeline class, its transformer config
    if config.streaming_output:
        # Chunks end at a request's preview steps (pipelines/step_previews.py), in every worker
        # process: vllm-omni imports the class by its name there.
        pipeline_class = f"{PREVIEW_PIPELINES}.{config.model_class_name}"
        config.custom_pipeline_args = {"pipeline_class": pipeline_class}
    if max_batch_size > 1 and not supports_request_batch(config):
        logger.info(
            "%s runs one image at a time in vllm-omni (it declares no request batching); "
            "--image-max-batch-size %d does not apply.",
            config.model_class_name,
            max_batch_size,
        )
        config.max_num_seqs = 1
    return config


def to_omni_request(
    request: EngineRequest,
    index: int,
    request_id: str,
    lora: ScaledLoRA | None = None,
    batch_key: tuple[Any, ...] | None = None,
) -> OmniDiffusionRequest:
    """Image `index` of `request` as one `OmniDiffusionRequest`, with its own seed and a CPU
    generator; `lora` is vllm-omni's request for `request.loras`; `batch_key` its
    `batch_compatibility_key` (pre-processing may extend it: requests whose keys differ never
    share a batch)."""
    from vllm_omni.diffusion.request import OmniDiffusionRequest
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams, OmniTextPrompt

    prompt = OmniTextPrompt(prompt=request.prompt)
    if request.negative_prompt is not None:
        prompt["negative_prompt"] = request.negative_prompt
    sampling: dict[str, Any] = {
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.num_inference_steps,
        "num_outputs_per_prompt": 1,
        "generator_device": "cpu",
        "emit_request_lifecycle": True,
    }
    if request.image is not None:  # an edit, for pipelines that take an input image
        prompt["multi_modal_data"] = {"image": request.image}
        if request.mask is not None:  # inpainting, for pipelines that take a mask
            prompt["multi_modal_data"]["mask_image"] = request.mask
    if request.strength is not None:
        sampling["strength"] = request.strength
    if request.true_cfg_scale is not None:
        sampling["true_cfg_scale"] = request.true_cfg_scale
    if request.guidance_scale is not None:
        sampling["guidance_scale"] = request.guidance_scale
    if lora is not None:
        sampling["lora_request"] = lora.request
        sampling["lora_scale"] = lora.scale
    if request.partial_images > 0:
        sampling["extra_args"] = {PARTIAL_IMAGES_ARG: request.partial_images}
    return OmniDiffusionRequest(
        prompt=prompt,  # one each: vllm-omni's pre-processing may write to it
        sampling_params=OmniDiffusionSamplingParams(seed=request.seeds[index], **sampling),
        request_id=request_id,
        batch_compatibility_key=batch_key,
    )


def pipeline_takes_masks(model_class_name: str) -> bool:
    """Whether the pipeline vllm-omni's registry holds for `model_class_name` inpaints (this
    package's pipelines say so with `support_image_task_mask`)."""
    return bool(getattr(_pipeline_class(model_class_name), "support_image_task_mask", False))


def reads_strength(config: OmniDiffusionConfig) -> bool:
    """Whether the pipeline class vllm-omni serves for `config` honours an edit's `strength`:
    the one rule, per served class (a diffusers pipeline through vllm-omni's adapter: when its
    `__call__` takes `strength`, which the adapter then passes)."""
    from vllm_omni.diffusion.models.diffusers_adapter.pipeline_utils import (
        resolve_diffusers_pipeline_class,
    )

    if config.diffusion_load_format == "diffusers":
        diffusers_class = resolve_diffusers_pipeline_class(config)
        if diffusers_class is not None:
            return "strength" in inspect.signature(diffusers_class.__call__).parameters
    pipeline_class = _pipeline_class(config.model_class_name)
    if pipeline_class is None:
        return False
    name = f"{pipeline_class.__module__}.{pipeline_class.__qualname__}"
    return bool(getattr(pipeline_class, STRENGTH_FLAG, name in VLLM_OMNI_STRENGTH_PIPELINES))


def _pipeline_class(model_class_name: str | None) -> type | None:
    """The class vllm-omni's registry holds for `model_class_name` (this package's where
    `pipelines/` registered one in its place); `None` for a name it does not hold."""
    from vllm_omni.diffusion.registry import DiffusionModelRegistry

    registered = DiffusionModelRegistry.models.get(model_class_name or "")
    return None if registered is None else registered.load_model_cls()


def refuse_unsupported(
    request: EngineRequest,
    model_class_name: str,
    *,
    takes_images: bool,
    takes_masks: bool,
    takes_strength: bool,
    defaults: ModelDefaults,
) -> None:
    """Raise `EngineRequestError` for what vllm-omni cannot do with this pipeline and engine
    (serving refuses a `strength` earlier, naming it: `ModelDefaults.supports_strength`)."""
    if request.image is not None and not takes_images:
        raise EngineRequestError(
            f"{model_class_name} takes no input image in vllm-omni, so this server "
            "cannot edit with it; serve an edit model (e.g. Qwen-Image-Edit), or this "
            "model with --image-engine diffusers (image-to-image)."
        )
    if request.mask is not None and not takes_masks:
        raise EngineRequestError(
            f"{model_class_name} takes no mask in vllm-omni, so this server cannot inpaint "
            "with it; edit without a mask, or serve with --image-engine diffusers."
        )
    if request.strength is not None and not takes_strength:
        raise EngineRequestError(
            f"strength is not supported by {model_class_name} in vllm-omni (it never reads "
            "it); leave strength out."
        )
    if request.partial_images and not defaults.supports_partial_images:
        raise EngineRequestError(
            "partial_images needs vllm-omni's streaming output: serve with "
            "--diffusion-streaming-output, or with --image-engine diffusers."
        )


def classify_failure(error: Exception, check_health: Callable[[], None]) -> EngineError:
    """This project's exception for a failure vllm-omni reported: `check_health`'s
    `EngineDiedError` if it raises one; out of memory told by the message (all vllm-omni keeps)."""
    from vllm_omni.errors import OmniClientError

    message = str(error) or type(error).__name__
    if isinstance(error, OmniClientError):
        return EngineRequestError(message)
    try:
        check_health()
    except EngineDiedError as died:
        return died
    if "out of memory" in message.lower():
        return EngineOutOfMemoryError(message)
    return EngineError(message)
