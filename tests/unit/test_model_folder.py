"""`model_folder.max_side`: the longest side each transformer can position-encode, read from its
config (the same numbers for both engines: `read_defaults` reads the loaded transformer's config
or, for vllm-omni's engine, the folder's `transformer/config.json`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_omni_images.engine.model_folder import (
    QWEN_IMAGE_ROPE_POSITIONS,
    QWEN_IMAGE_TEXT_TOKENS,
    defaults_for_pipeline_class,
    max_side,
)

QWEN_IMAGE = {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2}
SD3 = {"_class_name": "SD3Transformer2DModel", "patch_size": 2}


@pytest.mark.parametrize(
    ("config", "side"),
    [
        # Qwen/Qwen-Image: 2 x (4096 - 1024 text) positions x 2x2 patches x VAE 8.
        (QWEN_IMAGE, 98_304),
        # stabilityai/stable-diffusion-3-medium and SD3.5 Large; SD3.5 Medium.
        ({**SD3, "pos_embed_max_size": 192}, 3072),
        ({**SD3, "pos_embed_max_size": 384}, 6144),
        # Tongyi-MAI/Z-Image-Turbo: 512 height and width positions.
        (
            {
                "_class_name": "ZImageTransformer2DModel",
                "all_patch_size": [2],
                "axes_lens": [1536, 512, 512],
            },
            8192,
        ),
        # FLUX computes its rotary positions for any size: no bound but the pixel limit.
        ({"_class_name": "FluxTransformer2DModel", "patch_size": 1}, None),
        ({"_class_name": "SomeOtherTransformer"}, None),
        (None, None),
    ],
)
def test_each_models_longest_side_comes_from_its_config(config, side):
    assert max_side(config, 8) == side


def test_qwen_images_rope_table_positions_exactly_its_longest_side():
    """diffusers' own RoPE of Qwen-Image (vllm-omni's is the same code): a side of `max_side`
    pixels and the longest prompt get all their positions; two patches more do not (the
    table runs out: the 500 the issue found for 16x131072)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    rope = QwenEmbedRope(theta=10000, axes_dim=[2, 2, 4], scale_rope=True)
    assert rope.pos_freqs.shape[0] == QWEN_IMAGE_ROPE_POSITIONS
    cpu = torch.device("cpu")
    side = max_side(QWEN_IMAGE, 8)
    assert side is not None
    patches = side // 16
    for width, fits in ((patches, True), (patches + 2, False)):
        image, text = rope([(1, 1, width)], cpu, max_txt_seq_len=QWEN_IMAGE_TEXT_TOKENS)
        assert image.shape[0] == width
        assert (text.shape[0] == QWEN_IMAGE_TEXT_TOKENS) is fits


def test_the_folder_is_read_where_no_transformer_is_loaded(tmp_path: Path) -> None:
    """As vllm-omni's engine reads its defaults: an empty pipeline and the folder's files."""
    assert defaults_for_pipeline_class("QwenImagePipeline", str(tmp_path)).max_side is None
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(QWEN_IMAGE))
    assert defaults_for_pipeline_class("QwenImagePipeline", str(tmp_path)).max_side == 98_304
