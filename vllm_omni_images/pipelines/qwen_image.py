"""vllm-omni's Qwen-Image pipeline that also starts from an input image (image-to-image,
variations) and keeps a masked region (inpainting), in request mode and in step mode; registered
in place of vllm-omni's own `QwenImagePipeline`. Its images match diffusers'
`QwenImageImg2ImgPipeline` / `QwenImageInpaintPipeline` for the same seed and strength."""

from __future__ import annotations

from typing import Any

import torch
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import (
    QwenImagePipeline,
    get_qwen_image_post_process_func,
)

from vllm_omni_images.pipelines.image_start import batch_key_pre_process
from vllm_omni_images.pipelines.image_to_image import ImageToImageMixin

__all__ = [
    "ImageTaskQwenImagePipeline",
    "get_image_task_qwen_image_pre_process_func",
    "get_qwen_image_post_process_func",  # vllm-omni's, looked up in this module once registered
]


def get_image_task_qwen_image_pre_process_func(od_config: Any) -> Any:
    """vllm-omni's pre-process hook: the batch key by task and strength (`image_start.py`)."""
    return batch_key_pre_process("qwen-image")


class ImageTaskQwenImagePipeline(ImageToImageMixin, QwenImagePipeline):
    """`QwenImagePipeline`, plus an input image and mask in the prompt's `multi_modal_data`
    (`image`, `mask_image`) with `sampling_params.strength`."""

    default_steps = 50

    def __init__(self, *, od_config: Any, prefix: str = "") -> None:
        super().__init__(od_config=od_config, prefix=prefix)
        self.latent_channels = self.vae.config.z_dim
        self.init_image_processors(self.vae_scale_factor * 2, self.latent_channels)

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A (1, 1, z, h, w) sample, normalised by the VAE's `latents_mean` / `latents_std`."""
        pixels = pixels.unsqueeze(2).to(self.device, self.dtype_of_latents())
        latents = self.vae.encode(pixels).latent_dist.sample(generator)
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        return ((latents - mean.to(latents)) * inverse_std.to(latents)).transpose(1, 2)

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (1, 1, self.transformer.in_channels // 4, *self.packed_latent_size(height, width))
