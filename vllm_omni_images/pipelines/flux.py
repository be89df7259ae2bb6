"""vllm-omni's FLUX.1 pipeline that also starts from an input image (image-to-image,
variations) and keeps a masked region (inpainting), in request mode; registered in place of
vllm-omni's own `FluxPipeline`. Its images match diffusers' `FluxImg2ImgPipeline` /
`FluxInpaintPipeline` for the same seed and strength."""

from __future__ import annotations

from typing import Any

from vllm_omni.diffusion.models.flux.pipeline_flux import FluxPipeline, get_flux_post_process_func

from vllm_omni_images.pipelines.image_start import batch_key_pre_process
from vllm_omni_images.pipelines.image_to_image import ImageToImageMixin

__all__ = [
    "ImageTaskFluxPipeline",
    "get_flux_post_process_func",  # vllm-omni's, looked up in this module once registered
    "get_image_task_flux_pre_process_func",
]


def get_image_task_flux_pre_process_func(od_config: Any) -> Any:
    """vllm-omni's pre-process hook: the batch key by task and strength (`image_start.py`)."""
    return batch_key_pre_process("flux")


class ImageTaskFluxPipeline(ImageToImageMixin, FluxPipeline):
    """`FluxPipeline`, plus an input image and mask in the prompt's `multi_modal_data`
    (`image`, `mask_image`) with `sampling_params.strength`."""

    default_steps = 28

    def __init__(self, *, od_config: Any, prefix: str = "") -> None:
        super().__init__(od_config=od_config, prefix=prefix)
        self.latent_channels = self.vae.config.latent_channels
        self.init_image_processors(self.vae_scale_factor * 2, self.latent_channels)

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (1, self.transformer.in_channels // 4, *self.packed_latent_size(height, width))
