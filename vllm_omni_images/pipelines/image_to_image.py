"""`ImageToImageMixin`: a vllm-omni flow-matching pipeline that also starts from an input image
and keeps a masked region, in request mode (`forward`) and step mode (`prepare_encode`,
`step_scheduler`). A pipeline supplies how its latents are encoded, shaped and scheduled."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import calculate_shift
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch

from vllm_omni_images.pipelines.image_start import (
    DEFAULT_STRENGTH,
    ImageStart,
    concat,
    noised,
    request_images,
    strength_schedule,
)

_START = "image_task_start"
"""The key of a step-mode request's `ImageStart` in its `StepRequestState.extra`."""


class ImageToImageMixin:
    """Put before a vllm-omni pipeline class whose `forward` reads each request's
    `sampling_params.latents` and the batch's `sigmas`, and steps through
    `scheduler_step_maybe_with_cfg`. Its batches must be of one task and strength
    (`image_start.batch_key_pre_process`). Not an `abc.ABC`: that base's empty `__slots__`
    would keep `step_previews.StepPreviews` from giving a built pipeline its class."""

    support_image_input: ClassVar[bool] = True
    support_image_task_mask: ClassVar[bool] = True
    """Whether the pipeline inpaints within `mask_image` (read by this package's engine)."""
    support_strength: ClassVar[bool] = True
    """Whether it reads `sampling_params.strength` (`engine.omni_requests.STRENGTH_FLAG`)."""

    # What the pipeline class provides (vllm-omni's own attributes):
    device: torch.device
    scheduler: Any
    text_encoder: Any
    transformer: Any
    vae: Any
    _pack_latents: Callable[..., torch.Tensor]
    """Packs latents 2x2 (FLUX's and Qwen-Image's; `pack` is overridden where it is absent)."""
    vae_scale_factor: int
    default_sample_size: int
    interrupt: bool
    default_steps: ClassVar[int]
    """The steps the pipeline's own `forward` runs when a request gives none."""
    _request_mode_start: ImageStart | None = None
    _request_mode_step: int = 0

    def init_image_processors(self, vae_scale_factor: int, latent_channels: int) -> None:
        """diffusers' image and mask processors of the img2img / inpaint pipelines."""
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=vae_scale_factor, vae_latent_channels=latent_channels
        )
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=vae_scale_factor,
            vae_latent_channels=latent_channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    # What each pipeline supplies:

    def start_size(self, sampling: Any) -> tuple[int, int, int]:
        """The request's height, width and steps, with the pipeline's defaults."""
        default = self.default_sample_size * self.vae_scale_factor
        steps = sampling.num_inference_steps or self.default_steps
        return sampling.height or default, sampling.width or default, steps

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The VAE latents of `pixels` (sampled from `generator`, normalised), noise-shaped;
        here an `AutoencoderKL`'s, shifted and scaled as its config says (FLUX's, SD3's)."""
        pixels = pixels.to(self.device, self.dtype_of_latents())
        latents = self.vae.encode(pixels).latent_dist.sample(generator)
        config = self.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one image's noise, before packing."""
        raise NotImplementedError

    def pack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One image's latents as the transformer takes them (here: packed 2x2 by the
        pipeline's own `_pack_latents`, FLUX's and Qwen-Image's)."""
        channels = self.transformer.in_channels // 4
        return self._pack_latents(latents, 1, channels, *self.packed_latent_size(height, width))

    def latent_mask(self, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The (1, 1, H, W) pixel mask as the noise is shaped, before packing (here: packed
        latents' pipelines, FLUX's and Qwen-Image's)."""
        resized = torch.nn.functional.interpolate(mask, size=self.packed_latent_size(height, width))
        return resized.repeat(1, self.transformer.in_channels // 4, 1, 1)

    def packed_latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latents' height and width before 2x2 packing (even)."""
        scale = self.vae_scale_factor * 2
        return 2 * (int(height) // scale), 2 * (int(width) // scale)

    def schedule_kwargs(self, height: int, width: int) -> dict[str, Any]:
        """The scheduler's `set_timesteps` arguments besides `sigmas` (here: packed latents'
        `mu`, from the image's token count, as FLUX's and Qwen-Image's `forward` compute it)."""
        latent_height, latent_width = self.packed_latent_size(height, width)
        config = self.scheduler.config
        mu = calculate_shift(
            (latent_height // 2) * (latent_width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"mu": mu}

    def base_sigmas(self, steps: int) -> np.ndarray | None:
        """The unshifted sigmas of the whole `steps`-step schedule that the pipeline's own
        `forward` runs without `sigmas`; `None`: `np.linspace(1, 1/steps, steps)`."""
        return None

    # Request mode: the whole batch in one call.

    def forward(self, req: DiffusionRequestBatch) -> Any:
        """Each request's start, then the pipeline's own forward from those latents over the
        truncated schedule; a batch without an input image is the pipeline's own."""
        image, _ = request_images(req.prompts[0])
        if image is None:
            return super().forward(req)  # type: ignore[misc]
        generators = req.collate_request_generators(1, None)
        if not isinstance(generators, list):
            generators = [generators] * req.num_reqs
        starts = [
            self.image_start(request.prompt, request.sampling_params, generator)
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
            return super().forward(DiffusionRequestBatch(requests=started))  # type: ignore[misc]
        finally:
            self._request_mode_start = None

    def scheduler_step_maybe_with_cfg(self, *args: Any, **kwargs: Any) -> Any:
        latents = super().scheduler_step_maybe_with_cfg(*args, **kwargs)  # type: ignore[misc]
        start = self._request_mode_start
        if start is not None and kwargs.get("per_request_scheduler") is None:
            latents = start.blend(latents, self._request_mode_step)
            self._request_mode_step += 1
        return latents

    # Step mode: one request's state, step by step.

    def prepare_encode(self, state: Any, **kwargs: Any) -> Any:
        image, _ = request_images(state.prompt)
        if image is None:
            return super().prepare_encode(state, **kwargs)  # type: ignore[misc]
        start = self.image_start(state.prompt, state.sampling, state.sampling.generator)
        state.sampling = copy.copy(state.sampling)
        state.sampling.sigmas = start.sigmas
        state = super().prepare_encode(state, **kwargs)  # type: ignore[misc]
        state.latents = start.latents
        state.extra[_START] = start
        return state

    def step_scheduler(self, state: Any, noise_pred: torch.Tensor, **kwargs: Any) -> None:
        super().step_scheduler(state, noise_pred, **kwargs)  # type: ignore[misc]
        start: ImageStart | None = state.extra.get(_START)
        if start is not None and not self.interrupt:
            state.latents = start.blend(state.latents, state.step_index - 1)

    # The start, in diffusers' order: the image's VAE sample, then the noise, both drawn from
    # the request's generator; the image noised to the first step's level.

    def image_start(
        self, prompt: Any, sampling: Any, generator: torch.Generator | None
    ) -> ImageStart:
        image, mask = request_images(prompt)
        assert image is not None
        height, width, steps = self.start_size(sampling)
        strength = DEFAULT_STRENGTH if sampling.strength is None else sampling.strength
        dtype = self.dtype_of_latents()
        pixels = self.image_processor.preprocess(image, height=height, width=width)
        image_latents = self.encode_image(pixels.to(dtype=torch.float32), generator)
        noise_shape = self.noise_shape(height, width)
        noise = randn_tensor(noise_shape, generator=generator, device=self.device, dtype=dtype)
        sigmas, shifted = strength_schedule(
            self.scheduler,
            steps,
            strength,
            self.base_sigmas(steps),
            **self.schedule_kwargs(height, width),
        )
        latents = noised(image_latents, noise, shifted[:1].to(self.device, dtype))
        start = ImageStart(
            latents=self.pack(latents, height, width),
            image_latents=self.pack(image_latents, height, width),
            noise=self.pack(noise, height, width),
            sigmas=sigmas,
            shifted_sigmas=shifted,
        )
        if mask is not None:
            start.mask = self.pack(self._mask(mask, height, width, dtype), height, width)
        return start

    def dtype_of_latents(self) -> torch.dtype:
        """The dtype the pipeline denoises in (here: its text encoder's, as FLUX's and
        Qwen-Image's `forward` use)."""
        return self.text_encoder.dtype

    def _mask(self, mask: Image.Image, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        pixels = self.mask_processor.preprocess(mask, height=height, width=width)
        return self.latent_mask(pixels, height, width).to(self.device, dtype)
