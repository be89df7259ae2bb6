"""Image engines behind one small interface, chosen by model and platform.

Importable without vLLM (the GPU benchmarks use engines with diffusers alone).
"""

from __future__ import annotations

from vllm_omni_images.engine.base import (
    BatchKey,
    EngineError,
    EngineOutOfMemoryError,
    EngineRequest,
    GenerationCancelled,
    ImageEngine,
    ModelDefaults,
    StepCallback,
    batch_key,
)

__all__ = [
    "ENGINE_NAMES",
    "BatchKey",
    "EngineError",
    "EngineOutOfMemoryError",
    "EngineRequest",
    "EngineUnavailableError",
    "GenerationCancelled",
    "ImageEngine",
    "ModelDefaults",
    "StepCallback",
    "batch_key",
    "create_engine",
    "resolve_engine_name",
]

ENGINE_NAMES = ("auto", "omni", "diffusers")


class EngineUnavailableError(RuntimeError):
    """The requested engine cannot serve this model on this machine."""


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def omni_supports(model: str) -> bool:
    """Whether vllm-omni's diffusion engine can serve `model` here.

    The vllm-omni engine is not wired in yet, so no model is routed to it; when it is, `auto`
    picks it on GPUs for the models it supports and no caller changes.
    """
    return False


def resolve_engine_name(requested: str, model: str, accelerator: bool | None = None) -> str:
    """`auto` → vllm-omni on an accelerator for the models it supports, diffusers otherwise."""
    if requested not in ENGINE_NAMES:
        raise ValueError(f"unknown image engine {requested!r}; choose one of {ENGINE_NAMES}")
    if requested != "auto":
        return requested
    if accelerator is None:
        accelerator = has_accelerator()
    if accelerator and omni_supports(model):
        return "omni"
    return "diffusers"


def create_engine(model: str, engine: str = "auto", device: str | None = None) -> ImageEngine:
    """Load `model` (a diffusers folder, a hub id, or `tiny-qwen-image`) into an engine."""
    from vllm_omni_images.tiny_model import resolve_model_path

    name = resolve_engine_name(engine, model)
    if name == "omni":
        raise EngineUnavailableError(
            "The vllm-omni image engine is not available in this version; "
            "use --image-engine diffusers (or auto)."
        )
    from vllm_omni_images.engine.diffusers_engine import DiffusersEngine

    return DiffusersEngine(resolve_model_path(model), device=device)
