"""What a diffusers model folder says about the model (pipeline class, defaults), read
without loading any weights."""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_omni_images.engine.base import DEFAULTS_FILE, ModelDefaults

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"

_FALLBACK_SIZE = 1024
_FALLBACK_STEPS = 50
_FALLBACK_SIZE_MULTIPLE = 8

QWEN_IMAGE_ROPE_POSITIONS = 4096
"""Entries per axis of Qwen-Image's rotary position table (`QwenEmbedRope`'s
`torch.arange(4096)`, in diffusers and vllm-omni alike; its config does not record it)."""
QWEN_IMAGE_TEXT_TOKENS = 1024
"""The most prompt tokens a Qwen-Image pipeline encodes (its `tokenizer_max_length`, vllm-omni's
default `max_sequence_length`): their positions follow the image's on the same table."""


def pipeline_class_name(model_path: str) -> str | None:
    """The `_class_name` of a local folder's `model_index.json`; `None` without one."""
    index = Path(model_path) / MODEL_INDEX
    if not index.is_file():
        return None
    name = json.loads(index.read_text()).get("_class_name")
    return name if isinstance(name, str) else None


def read_defaults(pipe: Any, model_path: str) -> ModelDefaults:
    """The model's size, steps and size rule from a diffusers pipeline (loaded, or an empty
    shell of its class), overridden by the model folder's `vllm_omni_images.json`."""
    size = _FALLBACK_SIZE
    sample_size = getattr(pipe, "default_sample_size", None)
    vae_scale_factor = getattr(pipe, "vae_scale_factor", None)
    if sample_size and vae_scale_factor:
        size = int(sample_size) * int(vae_scale_factor)
    steps = _call_default(pipe, "num_inference_steps")
    values: dict[str, Any] = {
        "width": size,
        "height": size,
        "num_inference_steps": steps if isinstance(steps, int) else _FALLBACK_STEPS,
        "size_multiple": _size_multiple(pipe),
        "max_side": max_side(_transformer_config(pipe, model_path), _vae_scale_factor(pipe)),
    }
    guidance = _call_default(pipe, "guidance_scale")
    if isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
        # Said to both engines: vllm-omni takes an omitted guidance_scale as 1.0, where the
        # pipeline's own default (FLUX.1-dev's distilled guidance: 3.5) is what diffusers runs.
        values["guidance_scale"] = float(guidance)
    if _terminal_shift(pipe, model_path):
        values["min_steps"] = 2
    override = Path(model_path) / DEFAULTS_FILE
    if override.is_file():
        values.update(json.loads(override.read_text()))
    return ModelDefaults(**values)


def _size_multiple(pipe: Any) -> int:
    """What width and height must be multiples of: the image processor's scale, and where the
    transformer patches unpacked latents itself (SD3's `patch_size`: 8 x 2) that too."""
    multiple = _FALLBACK_SIZE_MULTIPLE
    processor = getattr(pipe, "image_processor", None)
    if processor is not None and getattr(processor.config, "vae_scale_factor", None):
        multiple = int(processor.config.vae_scale_factor)
    patch_size = getattr(pipe, "patch_size", None)
    vae_scale_factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(patch_size, int) and isinstance(vae_scale_factor, int):
        multiple = math.lcm(multiple, vae_scale_factor * patch_size)
    return multiple


def max_side(transformer: Mapping[str, Any] | None, vae_scale_factor: int) -> int | None:
    """The longest side, in pixels, whose positions the transformer of config `transformer`
    encodes: a side of `patches` positions is `patches x patch_size x vae_scale_factor` pixels.
    `None` where it computes positions for any size (FLUX) or the model is not known."""
    if transformer is None:
        return None
    name = transformer.get("_class_name")
    patch_size = int(transformer.get("patch_size") or 1)
    if name == "QwenImageTransformer2DModel":
        # Its RoPE centres the image: half of each side's positions, then the text's, are
        # taken from the table, so a side has 2 x (table - text) positions at most.
        patches = 2 * (QWEN_IMAGE_ROPE_POSITIONS - QWEN_IMAGE_TEXT_TOKENS)
    elif name == "SD3Transformer2DModel" and transformer.get("pos_embed_max_size"):
        patches = int(transformer["pos_embed_max_size"])  # its learned table, cropped per size
    elif name == "ZImageTransformer2DModel" and transformer.get("axes_lens"):
        # RoPE tables per axis of (caption and frame, height, width); the smallest patch is
        # the fewest pixels per position.
        patches = min(int(length) for length in transformer["axes_lens"][1:])
        patch_size = min(int(size) for size in transformer.get("all_patch_size") or [2])
    else:
        return None
    return patches * patch_size * vae_scale_factor


def _transformer_config(pipe: Any, model_path: str) -> Mapping[str, Any] | None:
    """The config of the pipeline's transformer: the loaded one's, or the folder's file."""
    transformer = getattr(pipe, "transformer", None)
    config = getattr(transformer, "config", None)
    if isinstance(config, Mapping):
        return {**config, "_class_name": type(transformer).__name__}
    path = Path(model_path) / "transformer" / "config.json"
    if not path.is_file():
        return None
    loaded = json.loads(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def _vae_scale_factor(pipe: Any) -> int:
    factor = getattr(pipe, "vae_scale_factor", None)
    return int(factor) if isinstance(factor, int) else _FALLBACK_SIZE_MULTIPLE


def _call_default(pipe: Any, name: str) -> Any:
    """The default of the pipeline call's parameter `name`; `None` without one."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def _terminal_shift(pipe: Any, model_path: str) -> bool:
    """Whether the (loaded, or the folder's) scheduler config sets `shift_terminal`."""
    scheduler = getattr(pipe, "scheduler", None)
    config: Any = getattr(scheduler, "config", None)
    if config is None:
        path = Path(model_path) / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
    return bool(config.get("shift_terminal"))


def pipeline_shell(class_name: str | None) -> Any:
    """diffusers' pipeline class `class_name` built with no components (enough for
    `read_defaults`); `None` when diffusers has no such class or it cannot be built so."""
    if class_name is None:
        return None
    import diffusers

    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None:
        return None
    components = {
        name: None
        for name, parameter in inspect.signature(pipeline_class.__init__).parameters.items()
        if name != "self" and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
    }
    try:
        return pipeline_class(**components)
    except Exception:  # a pipeline whose __init__ needs real components
        logger.debug("Cannot build an empty %s to read its defaults", class_name, exc_info=True)
        return None


def defaults_for_pipeline_class(class_name: str | None, model_path: str) -> ModelDefaults:
    """The defaults of a model served by pipeline class `class_name` from `model_path`."""
    shell = pipeline_shell(class_name)
    if shell is None:
        logger.warning(
            "diffusers has no usable %s to read defaults from; using %dx%d, %d steps, sizes "
            "in multiples of %d (a %s in the model folder overrides them).",
            class_name,
            _FALLBACK_SIZE,
            _FALLBACK_SIZE,
            _FALLBACK_STEPS,
            _FALLBACK_SIZE_MULTIPLE,
            DEFAULTS_FILE,
        )
        shell = _NoPipeline()
    return read_defaults(shell, model_path)


class _NoPipeline:
    def __call__(self) -> None:
        return None
