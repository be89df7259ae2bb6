"""`tiny-flux`: FLUX.1-dev's pipeline classes (diffusers' `FluxPipeline`: FluxTransformer2DModel,
AutoencoderKL, CLIPTextModel + CLIPTokenizer, T5EncoderModel + T5TokenizerFast,
FlowMatchEulerDiscreteScheduler) with a handful of channels, one or two layers and random
weights, built deterministically and offline (the tokenizers from small vocabularies, no hub)
into a cache folder in a few seconds. Shared by the tests.

Its images are noise-like, but every component, config key and wiring is FLUX.1-dev's: guidance
embedding, the 2x2 latent packing, a VAE of four blocks (scale factor 8) with FLUX's scaling and
shift factors, and its scheduler's dynamic shift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_omni_images.engine.base import DEFAULTS_FILE
from vllm_omni_images.tiny_model import MARKER_FILE, cache_dir, ensure_built

TINY_FLUX_NAME = "tiny-flux"
# Bump when the built model changes, so stale caches are rebuilt instead of reused.
TINY_FLUX_VERSION = 1

TINY_FLUX_DEFAULTS = {"width": 64, "height": 64, "num_inference_steps": 4}
"""Serving size and steps (FLUX's own, 1024 and 28, are far too slow on a CPU test)."""

_SEED = 0
_TEXT_WIDTH = 32  # CLIP's hidden size (the pooled projection) and T5's d_model
_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 512
# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev.
_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
_WEIGHT_GAIN = 3.0
"""Multiplies the transformer's linear weights after PyTorch's default init, so that the
prompt, the negative prompt and the guidance visibly change the image."""


def tiny_flux_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{TINY_FLUX_NAME}-v{TINY_FLUX_VERSION}"


def ensure_tiny_flux(root: Path | None = None) -> Path:
    """The tiny FLUX folder under `root` (default: the model cache), built first if not there."""
    return ensure_built(tiny_flux_path(root), TINY_FLUX_VERSION, build_tiny_flux)


def build_tiny_flux(path: Path) -> None:
    """Build the tiny FLUX pipeline into `path` (the same weights on every build)."""
    build_flux_pipeline().save_pretrained(path, safe_serialization=True)
    (path / DEFAULTS_FILE).write_text(json.dumps(TINY_FLUX_DEFAULTS, indent=2) + "\n")
    (path / MARKER_FILE).write_text(json.dumps({"version": TINY_FLUX_VERSION}) + "\n")


def build_flux_pipeline() -> Any:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        transformer: Any = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed into 2x2 patches
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_WIDTH,
            pooled_projection_dim=_TEXT_WIDTH,
            guidance_embeds=True,  # FLUX.1-dev's distilled guidance
            axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim, as (16, 56, 56) to 128
        )
        amplify_linear_weights(transformer)
        vae = tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)
        text_encoder = clip_text_encoder(CLIPTextModel, tokenizer)
        text_encoder_2 = t5_text_encoder(tokenizer_2)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def amplify_linear_weights(model: Any) -> None:
    """Multiply `model`'s linear weights by `_WEIGHT_GAIN` (after PyTorch's default init)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(_WEIGHT_GAIN)


def tiny_vae(*, scaling_factor: float, shift_factor: float) -> Any:
    """FLUX's and SD3's `AutoencoderKL` layout (four blocks: scale factor 8, 16 latent channels,
    no quant convs) at a few channels, with the model's latent scaling and shift; seeded."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(_SEED)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_size=1024,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def clip_text_encoder(
    model_class: Any, tokenizer: Any, width: int = _TEXT_WIDTH, seed: int = _SEED
) -> Any:
    """A two-layer CLIP text model of `model_class` (`CLIPTextModel`, or
    `CLIPTextModelWithProjection`) for `clip_tokenizer()`'s vocabulary, `width` wide (its
    projection too), pooled at the first end-of-text token; seeded with `seed`."""
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=width,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled at the first end-of-text token
        pad_token_id=tokenizer.pad_token_id,
    )
    return model_class(config).eval()


def t5_text_encoder(tokenizer: Any, width: int = _TEXT_WIDTH) -> Any:
    """A two-layer T5 v1.1 encoder (gated gelu_new) for `t5_tokenizer()`'s vocabulary, with
    `width` as its d_model; seeded."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(_SEED)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # T5 v1.1's: gelu_new, gated
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def clip_tokenizer() -> Any:
    """CLIP's byte-level BPE with no merges: every byte is a token, within a word and (with
    `</w>`) at its end; the two special tokens last, as in CLIP's vocabulary."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(f"{char}</w>" for char in alphabet), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LENGTH)


def t5_tokenizer() -> Any:
    """T5's Unigram with `<pad>`, `</s>`, `<unk>`, the word marker and one piece per printable
    ASCII character (no sentinel tokens)."""
    from transformers import T5Tokenizer  # the fast one: FLUX's T5TokenizerFast is its alias

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces = [(chr(code), -3.0) for code in range(33, 127)]
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0, model_max_length=_T5_MAX_LENGTH)
