"""`tiny-sd3`: Stable Diffusion 3's pipeline classes (diffusers' `StableDiffusion3Pipeline`:
SD3Transformer2DModel, AutoencoderKL, two CLIPTextModelWithProjection + CLIPTokenizer,
T5EncoderModel + T5TokenizerFast, FlowMatchEulerDiscreteScheduler) with a handful of channels,
two layers and random weights, built deterministically and offline (`testing/tiny_flux.py`'s
tokenizers and encoders) into a cache folder in a few seconds. Shared by the tests.

Its images are noise-like, but every component, config key and wiring is SD3-medium's:
latents that are not packed (the transformer patches them itself), the two CLIP encoders'
hidden states concatenated and padded to T5's width, their pooled outputs concatenated, SD3's
VAE scaling and shift factors, and its scheduler's fixed shift of 3.0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testing.tiny_flux import (
    amplify_linear_weights,
    clip_text_encoder,
    clip_tokenizer,
    t5_text_encoder,
    t5_tokenizer,
    tiny_vae,
)
from vllm_omni_images.engine.base import DEFAULTS_FILE
from vllm_omni_images.tiny_model import MARKER_FILE, cache_dir, ensure_built

TINY_SD3_NAME = "tiny-sd3"
# Bump when the built model changes, so stale caches are rebuilt instead of reused.
TINY_SD3_VERSION = 1

TINY_SD3_DEFAULTS = {"width": 64, "height": 64, "num_inference_steps": 4}
"""Serving size and steps (SD3's own, 1024 and 28, are far too slow on a CPU test)."""

_SEED = 0
_CLIP_WIDTHS = (16, 32)
"""The two CLIP encoders' widths (CLIP-L's 768 and CLIP-G's 1280): their hidden states are
concatenated (48) and padded to T5's width, their pooled outputs concatenated (48)."""
_T5_WIDTH = 64
"""T5's d_model, the transformer's `joint_attention_dim` (SD3's 4096)."""
# scheduler/scheduler_config.json of stabilityai/stable-diffusion-3-medium-diffusers.
_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
# vae/config.json of the same folder.
_VAE_SCALING = {"scaling_factor": 1.5305, "shift_factor": 0.0609}


def tiny_sd3_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{TINY_SD3_NAME}-v{TINY_SD3_VERSION}"


def ensure_tiny_sd3(root: Path | None = None) -> Path:
    """The tiny SD3 folder under `root` (default: the model cache), built first if not there."""
    return ensure_built(tiny_sd3_path(root), TINY_SD3_VERSION, build_tiny_sd3)


def build_tiny_sd3(path: Path) -> None:
    """Build the tiny SD3 pipeline into `path` (the same weights on every build)."""
    build_sd3_pipeline().save_pretrained(path, safe_serialization=True)
    (path / DEFAULTS_FILE).write_text(json.dumps(TINY_SD3_DEFAULTS, indent=2) + "\n")
    (path / MARKER_FILE).write_text(json.dumps({"version": TINY_SD3_VERSION}) + "\n")


def build_sd3_pipeline() -> Any:
    """diffusers' `StableDiffusion3Pipeline` with tiny components, the same on every build."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer()
    tokenizer_3 = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        transformer: Any = SD3Transformer2DModel(
            sample_size=32,  # SD3's 128 latent pixels, with its pos_embed_max_size ratio
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=_T5_WIDTH,
            caption_projection_dim=16,  # the transformer's width: heads x head size
            pooled_projection_dim=sum(_CLIP_WIDTHS),
            out_channels=16,
            pos_embed_max_size=48,
        )
        amplify_linear_weights(transformer)
        vae = tiny_vae(**_VAE_SCALING)
        text_encoders = [
            clip_text_encoder(CLIPTextModelWithProjection, tokenizer, width, seed=_SEED + index)
            for index, width in enumerate(_CLIP_WIDTHS)
        ]
        text_encoder_3 = t5_text_encoder(tokenizer_3, _T5_WIDTH)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
