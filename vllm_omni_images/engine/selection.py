"""Which engine serves a model: `--image-engine auto|omni|diffusers`, resolved by platform.

Cheap to import (the `vllm serve` flags read `ENGINE_NAMES` in every vLLM process): torch and
the engines are imported only when an engine is chosen or built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_omni_images.engine.errors import EngineUnavailableError

if TYPE_CHECKING:
    from vllm_omni_images.engine.base import ImageEngine

ENGINE_NAMES = ("auto", "omni", "diffusers")


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def omni_supports(model_path: str) -> bool:
    """Whether vllm-omni's diffusion engine can serve the model folder `model_path` here.

    The vllm-omni engine is not wired in yet, so no model is routed to it; when it is, `auto`
    picks it on GPUs for the models it supports and no caller changes.
    """
    return False


def resolve_engine_name(requested: str, model_path: str, accelerator: bool | None = None) -> str:
    """`auto` → vllm-omni on an accelerator for the models it supports, diffusers otherwise."""
    if requested not in ENGINE_NAMES:
        raise ValueError(f"unknown image engine {requested!r}; choose one of {ENGINE_NAMES}")
    if requested != "auto":
        return requested
    if accelerator is None:
        accelerator = has_accelerator()
    if accelerator and omni_supports(model_path):
        return "omni"
    return "diffusers"


def create_engine(model_path: str, engine: str = "auto", device: str | None = None) -> ImageEngine:
    """Load the model at `model_path` (a diffusers folder or hub id) into the chosen engine."""
    name = resolve_engine_name(engine, model_path)
    if name == "omni":
        raise EngineUnavailableError(
            "The vllm-omni image engine is not available in this version; "
            "use --image-engine diffusers (or auto)."
        )
    from vllm_omni_images.engine.diffusers_engine import DiffusersEngine

    return DiffusersEngine(model_path, device=device)
