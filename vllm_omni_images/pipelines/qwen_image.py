"""vllm-omni's Qwen-Image pipeline that also starts from an input image (image-to-image,
variations) and keeps a masked region (inpainting), in request mode and in step mode; registered
in place of vllm-omni's own `QwenImagePipeline`. Its images match diffusers'
`QwenImageImg2ImgPipeline` / `QwenImageInpaintPipeline` for the same seed and strength."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import (
    QwenImagePipeline,
    calculate_shift,
    get_qwen_image_post_process_func,
)
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch

from vllm_omni_images.pipelines.image_start import (
    DEFAULT_STRENGTH,
    ImageStart,
    batch_key_pre_process,
    concat,
    request_images,
    strength_schedule,
)

__all__ = [
    "ImageTaskQwenImagePipeline",
    "get_image_task_qwen_image_pre_process_func",
    "get_qwen_image_post_process_func",  # vllm-omni's, looked up in this module once registered
]

_START = "image_task_start"
"""The key of a step-mode request's `ImageStart` in its `StepRequestState.extra`."""


def get_image_task_qwen_image_pre_process_func(od_config: Any) -> Any:
    """vllm-omni's pre-process hook: the batch key by task and strength (`image_start.py`)."""
    return batch_key_pre_process("qwen-image")


class ImageTaskQwenImagePipeline(QwenImagePipeline):
    """`QwenImagePipeline`, plus an input image and mask in the prompt's `multi_modal_data`
    (`image`, `mask_image`) with `sampling_params.strength`. Batches are one task, one strength."""

    support_image_input: ClassVar[bool] = True
    support_image_task_mask: ClassVar[bool] = True
    """Whether the pipeline inpaints within `mask_image` (read by this package's engine)."""

    def __init__(self, *, od_config: Any, prefix: str = "") -> None:
        super().__init__(od_config=od_config, prefix=prefix)
        self.latent_channels = self.vae.config.z_dim
        scale = self.vae_scale_factor * 2
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=scale, vae_latent_channels=self.latent_channels
        )
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale,
            vae_latent_channels=self.latent_channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        self._request_mode_start: ImageStart | None = None
        self._request_mode_step = 0

    # Request mode: the whole batch in one call.

    def forward(self, req: DiffusionRequestBatch) -> Any:
        """A batch of one task and strength (`batch_key_pre_process`): each request's start,
        then vllm-omni's own forward from those latents over the truncated schedule."""
        image, _ = request_images(req.prompts[0])
        if image is None:
            return super().forward(req)
        generators = req.collate_request_generators(1, None)
        if not isinstance(generators, list):
            generators = [generators] * req.num_reqs
        starts = [
            self._image_start(request.prompt, request.sampling_params, generator)
            for request, generator in zip(req.requests, generators, strict=True)
        ]
        started = []
        for request, start in zip(req.requests, starts, strict=True):
            request = copy.copy(request)
            request.sampling_params = copy.copy(request.sampling_params)
            request.sampling_params.latents = start.latents
            request.sampling_params.sigmas = start.sigmas
            started.append(request)
        first = starts[0]
        self._request_mode_start = ImageStart(
            latents=concat(starts, "latents"),
            image_latents=concat(starts, "image_latents"),
            noise=concat(starts, "noise"),
            sigmas=first.sigmas,
            shifted_sigmas=first.shifted_sigmas,
            mask=None if first.mask is None else concat(starts, "mask"),
        )
        self._request_mode_step = 0
        try:
            return super().forward(DiffusionRequestBatch(requests=started))
        finally:
            self._request_mode_start = None

    def scheduler_step_maybe_with_cfg(self, *args: Any, **kwargs: Any) -> Any:
        latents = super().scheduler_step_maybe_with_cfg(*args, **kwargs)
        start = self._request_mode_start
        if start is not None and kwargs.get("per_request_scheduler") is None:
            latents = start.blend(latents, self._request_mode_step)
            self._request_mode_step += 1
        return latents

    # Step mode: one request's state, step by step.

    def prepare_encode(self, state: Any, **kwargs: Any) -> Any:
        image, _ = request_images(state.prompt)
        if image is None:
            return super().prepare_encode(state, **kwargs)
        start = self._image_start(state.prompt, state.sampling, state.sampling.generator)
        state.sampling = copy.copy(state.sampling)
        state.sampling.sigmas = start.sigmas
        state = super().prepare_encode(state, **kwargs)
        state.latents = start.latents
        state.extra[_START] = start
        return state

    def step_scheduler(self, state: Any, noise_pred: torch.Tensor, **kwargs: Any) -> None:
        super().step_scheduler(state, noise_pred, **kwargs)
        start: ImageStart | None = state.extra.get(_START)
        if start is not None and not self.interrupt:
            state.latents = start.blend(state.latents, state.step_index - 1)

    # The start from the input image, as diffusers' img2img and inpaint pipelines make it.

    def _image_start(
        self, prompt: Any, sampling: Any, generator: torch.Generator | None
    ) -> ImageStart:
        """Encode the input image (a VAE sample drawn from the request's generator), then draw
        the noise, in diffusers' order, and noise the image to the first step's level."""
        image, mask = request_images(prompt)
        assert image is not None
        height = sampling.height or self.default_sample_size * self.vae_scale_factor
        width = sampling.width or self.default_sample_size * self.vae_scale_factor
        steps = sampling.num_inference_steps or 50
        strength = DEFAULT_STRENGTH if sampling.strength is None else sampling.strength
        dtype = self.text_encoder.dtype
        latent_height, latent_width = self._latent_size(height, width)
        channels = self.transformer.in_channels // 4

        pixels = self.image_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(dtype=torch.float32).unsqueeze(2).to(self.device, dtype)
        image_latents = self._encode_image(pixels, generator).transpose(1, 2)
        shape = (1, 1, channels, latent_height, latent_width)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)

        image_seq_len = (latent_height // 2) * (latent_width // 2)
        mu = calculate_shift(
            image_seq_len,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        sigmas, shifted = strength_schedule(self.scheduler, steps, strength, mu=mu)
        first = shifted[:1].to(self.device, dtype)

        def pack(latents: torch.Tensor) -> torch.Tensor:
            return self._pack_latents(latents, 1, channels, latent_height, latent_width)

        start = ImageStart(
            latents=pack(first * noise + (1.0 - first) * image_latents),
            image_latents=pack(image_latents),
            noise=pack(noise),
            sigmas=sigmas,
            shifted_sigmas=shifted,
        )
        if mask is not None:
            latent_mask = self._latent_mask(mask, height, width, dtype)
            start.mask = pack(latent_mask.repeat(1, channels, 1, 1))
        return start

    def _encode_image(
        self, pixels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The image's VAE latents, sampled and normalised as diffusers' Qwen-Image does."""
        latents = self.vae.encode(pixels).latent_dist.sample(generator)
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        return (latents - mean.to(latents)) * inverse_std.to(latents)

    def _latent_mask(
        self, mask: Image.Image, height: int, width: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The binarised mask at the latents' size (1: change, 0: keep)."""
        pixels = self.mask_processor.preprocess(mask, height=height, width=width)
        size = self._latent_size(height, width)
        return torch.nn.functional.interpolate(pixels, size=size).to(self.device, dtype)

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latents' height and width before packing (even, for the 2x2 patches)."""
        scale = self.vae_scale_factor * 2
        return 2 * (int(height) // scale), 2 * (int(width) // scale)
