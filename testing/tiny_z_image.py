"""A tiny Z-Image folder: diffusers' `ZImagePipeline` layout (its transformer, a FLUX-style
`AutoencoderKL`, a Qwen3 text encoder, a Qwen2 tokenizer with a chat template) at a handful of
channels and two layers, random weights, built locally. Shared by the tests that run
vllm-omni's Z-Image pipeline on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_omni_images.engine.base import DEFAULTS_FILE
from vllm_omni_images.tiny_model import _SEED, TINY_MODEL_DEFAULTS, _build_tokenizer

# Qwen3's template, as Z-Image applies it (a user turn, then the assistant's with thinking on).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_HIDDEN = 32
"""The text encoder's width, which is the transformer's `cap_feat_dim`."""

# Z-Image's scheduler and VAE constants (its released folder's).
_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
_VAE_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def build_tiny_z_image(path: Path) -> Path:
    """Write the random-weight `ZImagePipeline` into `path` (deterministic) with the embedded
    model's serving defaults, and return `path`."""
    build_z_image_pipeline().save_pretrained(path, safe_serialization=True)
    (path / DEFAULTS_FILE).write_text(json.dumps(TINY_MODEL_DEFAULTS, indent=2) + "\n")
    return path


def build_z_image_pipeline() -> Any:
    """Diffusers' `ZImagePipeline` with tiny components, the same on every build."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=TEXT_HIDDEN,
            axes_dims=[4, 6, 6],  # sums to the head size, 32 / 2
            axes_lens=[256, 128, 128],
        )
        torch.manual_seed(_SEED)
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 16, 16, 16],
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **_VAE_SCALING,
        )
        torch.manual_seed(_SEED)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,  # Z-Image reads the one before last
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=1024,
                tie_word_embeddings=True,
            )
        ).eval()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
