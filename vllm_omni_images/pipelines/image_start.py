"""Image-to-image and inpainting for flow-matching pipelines, as diffusers' img2img and inpaint
pipelines do them: the schedule's last `steps x strength` steps (a truncated `sigmas` list, which
vllm-omni's `diffuse()` and step mode both run as they are), the input's latents noised to the
first of them, and for inpainting the kept region put back, noised to each step's level."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

DEFAULT_STRENGTH = 0.6
"""`strength` when a request leaves it unset: diffusers' img2img and inpaint pipelines' default."""

IMAGE_KEY = "image"
MASK_KEY = "mask_image"
"""The prompt's `multi_modal_data` keys of the input image and its mask (vllm-omni's own)."""


def request_images(prompt: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """The input image and mask a vllm-omni prompt carries (`None` where it has none)."""
    data = prompt.get("multi_modal_data") if isinstance(prompt, Mapping) else None
    if not data:
        return None, None
    image, mask = data.get(IMAGE_KEY), data.get(MASK_KEY)
    if isinstance(image, list):  # vllm-omni's edit endpoint may send a list of one
        image = image[0] if len(image) == 1 else None
    if mask is not None and image is None:
        raise ValueError("A mask needs the image it masks.")
    return image, mask


def task_of(prompt: Any) -> str:
    """`generate`, `edit` (image-to-image) or `inpaint`, as `EngineRequest.task` says it."""
    image, mask = request_images(prompt)
    if image is None:
        return "generate"
    return "edit" if mask is None else "inpaint"


def batch_key_pre_process(family: str) -> Callable[[Any], Any]:
    """A vllm-omni pre-process function that keeps generations, image-to-image and inpainting,
    and different strengths, out of one batch (`batch_compatibility_key`, extended: a key set
    before it, e.g. by the engine, is kept)."""

    def pre_process(request: Any) -> Any:
        task = task_of(request.prompt)
        strength = None if task == "generate" else request.sampling_params.strength
        request.batch_compatibility_key = (request.batch_compatibility_key, family, task, strength)
        return request

    return pre_process


def strength_schedule(
    scheduler: Any,
    steps: int,
    strength: float,
    base_sigmas: np.ndarray | None = None,
    **set_timesteps: Any,
) -> tuple[list[float], torch.Tensor]:
    """The `sigmas` to pass for the last `steps x strength` of a `steps`-step schedule (before
    the scheduler's shift), and the shifted sigmas they run through, ending with the terminal 0.
    `base_sigmas`: the whole schedule's, `np.linspace(1, 1/steps, steps)` (vllm-omni's Qwen-Image
    and FLUX.1) unless given. `set_timesteps` are the scheduler's own (e.g. `mu`); `scheduler`
    is not changed."""
    full = np.linspace(1.0, 1 / steps, steps) if base_sigmas is None else np.asarray(base_sigmas)
    if len(full) != steps:
        raise ValueError(f"{len(full)} base sigmas for {steps} steps")
    # diffusers' get_timesteps, exactly: the steps that run are the last init_timestep ones.
    init_timestep = min(steps * strength, steps)
    t_start = int(max(steps - init_timestep, 0))
    if t_start >= steps:
        raise ValueError(f"strength {strength} leaves none of the {steps} steps to run")
    whole, tail = copy.deepcopy(scheduler), copy.deepcopy(scheduler)
    whole.set_timesteps(sigmas=full, **set_timesteps)
    tail.set_timesteps(sigmas=full[t_start:], **set_timesteps)
    if not torch.equal(whole.sigmas[t_start:], tail.sigmas):
        # Karras-like schedules depend on the whole list: a truncated one would differ.
        raise ValueError(f"{type(scheduler).__name__}'s schedule cannot be truncated")
    return full[t_start:].tolist(), tail.sigmas


def scheduler_default_sigmas(scheduler: Any, steps: int) -> np.ndarray:
    """The unshifted sigmas a flow-matching scheduler builds for `steps` steps when given none
    (diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps`: evenly from its training
    schedule's `sigma_max` down to its `sigma_min`), as SD3's pipelines run."""
    train_steps = scheduler.config.num_train_timesteps
    start, end = scheduler.sigma_max * train_steps, scheduler.sigma_min * train_steps
    return np.linspace(start, end, steps) / train_steps


def noised(image_latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The latents at noise level `sigma` (a flow-matching scheduler's `scale_noise`)."""
    return sigma * noise + (1.0 - sigma) * image_latents


@dataclass
class ImageStart:
    """One request's start from an input image, all latents packed as the transformer takes
    them: `latents` to denoise from, and what inpainting blends with after each step."""

    latents: torch.Tensor
    image_latents: torch.Tensor
    noise: torch.Tensor
    sigmas: list[float]
    """The `sigmas` the pipeline's schedule is built from (`strength_schedule`)."""
    shifted_sigmas: torch.Tensor
    """The levels each step ends at: `shifted_sigmas[i + 1]` after step `i`."""
    mask: torch.Tensor | None = None
    """Inpainting: 1 where the image is to change, 0 where it is kept."""

    def blend(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """`latents` after step `step` (0-based), with the kept region put back at its level."""
        if self.mask is None:
            return latents
        sigma = self.shifted_sigmas[step + 1].to(latents.device, latents.dtype)
        kept = noised(self.image_latents, self.noise, sigma)
        return (1 - self.mask) * kept + self.mask * latents


def concat(starts: list[ImageStart], name: str) -> torch.Tensor:
    """One batched tensor of the starts' `name` field, in order."""
    return torch.cat([getattr(start, name) for start in starts], dim=0)
