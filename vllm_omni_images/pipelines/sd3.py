"""vllm-omni's Stable Diffusion 3 pipeline that also starts from an input image (image-to-image,
variations) and keeps a masked region (inpainting), in request mode; registered in place of
vllm-omni's own `StableDiffusion3Pipeline`. Its images match diffusers'
`StableDiffusion3Img2ImgPipeline` / `StableDiffusion3InpaintPipeline` for the same seed and
strength: SD3's latents are not packed, and its schedule is the scheduler's own."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm_omni.diffusion.models.sd3.pipeline_sd3 import (
    StableDiffusion3Pipeline,
    calculate_shift,
    get_sd3_image_post_process_func,
)

from vllm_omni_images.pipelines.image_start import batch_key_pre_process, scheduler_default_sigmas
from vllm_omni_images.pipelines.image_to_image import ImageToImageMixin

__all__ = [
    "ImageTaskSD3Pipeline",
    "get_image_task_sd3_pre_process_func",
    "get_sd3_image_post_process_func",  # vllm-omni's, looked up in this module once registered
]


def get_image_task_sd3_pre_process_func(od_config: Any) -> Any:
    """vllm-omni's pre-process hook: the batch key by task and strength (`image_start.py`)."""
    return batch_key_pre_process("sd3")


class ImageTaskSD3Pipeline(ImageToImageMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline`, plus an input image and mask in the prompt's
    `multi_modal_data` (`image`, `mask_image`) with `sampling_params.strength`."""

    default_steps = 28

    def __init__(self, *, od_config: Any, prefix: str = "") -> None:
        super().__init__(od_config=od_config, prefix=prefix)
        self.latent_channels = self.vae.config.latent_channels
        self.init_image_processors(self.vae_scale_factor, self.latent_channels)

    def dtype_of_latents(self) -> torch.dtype:
        return self.od_config.dtype  # what `forward` casts the latents to

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (1, self.latent_channels, *self.latent_size(height, width))

    def pack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """SD3's transformer patches the latents itself: they stay (B, C, h, w)."""
        return latents

    def latent_mask(self, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The (1, 1, h, w) mask, broadcast over the channels as diffusers' inpainting does."""
        return torch.nn.functional.interpolate(mask, size=self.latent_size(height, width))

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor

    def base_sigmas(self, steps: int) -> np.ndarray:
        """The scheduler's own schedule, which `forward` runs when given no `sigmas`."""
        return scheduler_default_sigmas(self.scheduler, steps)

    def schedule_kwargs(self, height: int, width: int) -> dict[str, Any]:
        """`mu` only for a scheduler with dynamic shifting, as vllm-omni's `prepare_timesteps`
        computes it (from `latents.shape[1]`, which is what `forward` passes it)."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", None):
            return {}
        mu = calculate_shift(
            self.latent_channels,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        return {"mu": mu}
