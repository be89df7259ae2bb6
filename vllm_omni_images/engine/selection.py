"""Which engine serves a model (`--image-engine`), and building it; torch and vllm-omni are
imported only when an engine is chosen or built."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_omni_images.engine.base import EngineObserver, ImageEngine, LoRASettings
from vllm_omni_images.engine.batching import BatchingConfig
from vllm_omni_images.engine.errors import EngineUnavailableError
from vllm_omni_images.engine.model_folder import pipeline_class_name
from vllm_omni_images.engine.names import ENGINE_NAMES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineChoice:
    name: str
    reason: str


@dataclass(frozen=True)
class EngineSettings:
    """What an engine is built with, beyond the model."""

    batching: BatchingConfig = field(
        default_factory=lambda: BatchingConfig(
            max_batch_size=1, batch_delay_ms=0, hang_grace_s=None
        )
    )
    """The batching flags, for either engine (by default no batching, no hang watch)."""
    omni_options: Mapping[str, Any] = field(default_factory=dict)
    """vllm-omni config fields by their vllm-omni names (`server/cli_args.OMNI_FLAGS`)."""
    dtype: str = "auto"
    """The weights' dtype (`--dtype`): `auto` is float32 on the CPU and bfloat16 on a GPU."""
    trust_remote_code: bool = False
    """Whether a pipeline's own code in its folder may run (`--trust-remote-code`)."""
    enforce_eager: bool = False
    """Keep vllm-omni from compiling the model (`--enforce-eager`); diffusers never compiles."""
    lora: LoRASettings | None = None
    """`--enable-lora`'s limits; `None`: no adapters."""


DTYPES = {
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float": "float32",
    "float32": "float32",
}
"""vLLM's `--dtype` choices (besides `auto`) and the torch dtype each names."""


def torch_dtype(name: str) -> Any:
    """The torch dtype `--dtype` names; `None` for `auto` (the engine's own choice)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise EngineUnavailableError(
            f"--dtype {name}: an image model's weights load as auto, {', '.join(DTYPES)}."
        )
    import torch

    return getattr(torch, DTYPES[name])


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def omni_platform() -> str | None:
    """The accelerator platform vllm-omni detects here (its own detection), or `None`."""
    from vllm_omni.platforms import resolve_current_omni_platform_cls_qualname

    qualname = resolve_current_omni_platform_cls_qualname()
    return None if qualname.endswith("UnspecifiedOmniPlatform") else qualname.rsplit(".", 1)[-1]


def omni_pipeline_class(model_path: str) -> str | None:
    """The pipeline class vllm-omni would serve `model_path` with, if its registry has it."""
    from vllm_omni.diffusion.data import resolve_model_class_name
    from vllm_omni.diffusion.registry import DiffusionModelRegistry

    # A local folder is read here; a hub id goes through vllm-omni's own resolution, which
    # reads only the repository's model_index.json (or config.json), never weights.
    name = pipeline_class_name(model_path) or resolve_model_class_name(model_path)
    if name is None or name not in DiffusionModelRegistry.get_supported_archs():
        return None
    return name


def choose_engine(requested: str, model_path: str) -> EngineChoice:
    """The engine for `requested` and why (docs/architecture.md, "What `auto` picks"); raises
    `EngineUnavailableError` when `omni` cannot be served here."""
    if requested not in ENGINE_NAMES:
        raise ValueError(f"unknown image engine {requested!r}; choose one of {ENGINE_NAMES}")
    if requested == "diffusers":
        return EngineChoice("diffusers", "--image-engine diffusers")
    if requested == "auto" and not has_accelerator():
        return EngineChoice(
            "diffusers",
            "no GPU here: on the CPU vllm-omni starts 1.6x slower and streams previews only "
            "in step mode (docs/performance.md); --image-engine omni serves through vllm-omni",
        )
    try:
        platform = omni_platform()
    except ImportError as error:  # diffusers installed without vllm-omni
        if requested == "omni":
            raise EngineUnavailableError(
                f"--image-engine omni: vllm-omni cannot be imported here ({error}); install "
                "it, or serve with --image-engine diffusers."
            ) from error
        return EngineChoice("diffusers", f"vllm-omni cannot be imported here ({error})")
    if platform is None:
        if requested == "omni":
            raise EngineUnavailableError(
                "--image-engine omni: vllm-omni detects no platform it supports here (is "
                "VLLM_PLUGINS set without image_task?); serve with --image-engine diffusers."
            )
        return EngineChoice("diffusers", "vllm-omni detects no platform it supports here")
    if requested == "omni":
        return EngineChoice("omni", f"--image-engine omni on {platform}")
    pipeline = omni_pipeline_class(model_path)
    if pipeline is None:
        found = pipeline_class_name(model_path)
        return EngineChoice(
            "diffusers", f"vllm-omni's diffusion registry has no pipeline {found or '(unknown)'}"
        )
    return EngineChoice("omni", f"{platform} and vllm-omni serves {pipeline}")


def create_engine(
    model_path: str,
    engine: str | EngineChoice = "auto",
    device: str | None = None,
    settings: EngineSettings | None = None,
    observer: EngineObserver | None = None,
) -> ImageEngine:
    """Load the model at `model_path` into the chosen engine, reporting to `observer`; raises
    `EngineUnavailableError` for vllm-omni's options without its engine."""
    settings = settings or EngineSettings()
    choice = engine if isinstance(engine, EngineChoice) else choose_engine(engine, model_path)
    logger.info("Image engine: %s (%s)", choice.name, choice.reason)
    if choice.name == "omni":
        from vllm_omni_images.engine.omni_engine import OmniEngine
        from vllm_omni_images.engine.omni_requests import build_omni_config

        batching = settings.batching
        options = dict(settings.omni_options)
        if settings.dtype != "auto":
            options["dtype"] = DTYPES.get(settings.dtype, settings.dtype)
        if settings.trust_remote_code:
            options["trust_remote_code"] = True
        if settings.enforce_eager:
            options["enforce_eager"] = True
        return OmniEngine(
            build_omni_config(
                model_path,
                options,
                max_batch_size=batching.max_batch_size,
                batch_delay_ms=batching.batch_delay_ms,
                lora=settings.lora,
            ),
            hang_grace_s=batching.hang_grace_s,
            observer=observer,
            lora=settings.lora,
            max_pixels_in_flight=batching.max_pixels_in_flight,
        )
    if settings.omni_options:
        # vllm-omni's option names are its flags' (`--cache-backend`), and vLLM's too.
        flags = [f"--{name.replace('_', '-')}" for name in settings.omni_options]
        one = len(flags) == 1
        raise EngineUnavailableError(
            f"{', '.join(flags)}: only the vllm-omni engine understands "
            f"{'this option' if one else 'these options'}, and this server uses the diffusers "
            f"engine ({choice.reason}). Drop {'it' if one else 'them'}, or serve on a GPU with "
            "--image-engine omni."
        )
    from vllm_omni_images.engine.batching import BatchingEngine
    from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

    runner = DiffusersRunner(
        model_path,
        device=device,
        dtype=torch_dtype(settings.dtype),
        trust_remote_code=settings.trust_remote_code,
        lora=settings.lora,
    )
    return BatchingEngine(runner, settings.batching, observer=observer)
