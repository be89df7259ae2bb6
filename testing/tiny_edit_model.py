"""A tiny Qwen-Image-Edit folder: diffusers' `QwenImageEditPipeline` layout with the embedded
tiny model's pieces (`vllm_omni_images.tiny_model`), a Qwen2.5-VL text encoder whose vision
tower sees the input image, and a `Qwen2VLProcessor` built locally; random weights, no hub.
Shared by the tests that run vllm-omni's edit pipeline on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_omni_images.engine.base import DEFAULTS_FILE
from vllm_omni_images.tiny_model import (
    _SEED,
    _TEMPLATE_TEXTS,
    TINY_MODEL_DEFAULTS,
    TINY_SHAPE,
    QwenImageShape,
    _build_text_encoder,
    _build_tokenizer,
    build_qwen_image_pipeline,
)

# The system part of Qwen-Image-Edit's prompt template. With a merge per word it is 64 tokens,
# as with Qwen's real tokenizer, so the pipeline's `prompt_template_encode_start_idx = 64`
# drops exactly it and the image and the user's prompt condition the edit.
EDIT_TEMPLATE_TEXT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate."
)

# Added in the order of the ids the text encoder reserves after the tokenizer's own
# (`image_token_id`, `video_token_id`, `vision_start_token_id`, `vision_end_token_id`).
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

PROCESSOR_MAX_PIXELS = 112 * 112
"""The vision tower sees the input image at most this large: 8x8 patches, 16 image tokens."""


def build_tiny_edit_model(path: Path, shape: QwenImageShape = TINY_SHAPE) -> Path:
    """Write a random-weight `QwenImageEditPipeline` of `shape` into `path` (deterministic) with
    the embedded model's serving defaults, and return `path`."""
    pipeline = build_qwen_image_edit_pipeline(shape)
    pipeline.save_pretrained(path, safe_serialization=True)
    (path / DEFAULTS_FILE).write_text(json.dumps(TINY_MODEL_DEFAULTS, indent=2) + "\n")
    return path


def build_qwen_image_edit_pipeline(shape: QwenImageShape) -> Any:
    """The tiny model's transformer, VAE and scheduler, with a text encoder and processor that
    read the input image: diffusers' `QwenImageEditPipeline`, the same on every build."""
    import torch
    from diffusers import QwenImageEditPipeline
    from tokenizers import AddedToken
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    generation = build_qwen_image_pipeline(shape)
    tokenizer = _build_tokenizer((*_TEMPLATE_TEXTS, EDIT_TEMPLATE_TEXT))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        text_encoder = _build_text_encoder(shape, vocab_size=len(tokenizer))
    tokenizer.add_tokens([AddedToken(token, special=True) for token in VISION_TOKENS])
    vision = text_encoder.config
    ids = [vision.image_token_id, vision.video_token_id]
    ids += [vision.vision_start_token_id, vision.vision_end_token_id]
    assert tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)) == ids
    pixels = {"min_pixels": 56 * 56, "max_pixels": PROCESSOR_MAX_PIXELS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
    )
    return QwenImageEditPipeline(
        scheduler=generation.scheduler,
        vae=generation.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=generation.transformer,
    )
