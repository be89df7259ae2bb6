"""Preview images (streamed partial images) decoded from a diffusers pipeline's intermediate
latents, for the pipelines `supports_previews` accepts."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image


def supports_previews(pipe: Any) -> bool:
    config = getattr(getattr(pipe, "vae", None), "config", None)
    return (
        hasattr(pipe, "_unpack_latents")
        and getattr(config, "latents_mean", None) is not None
        and getattr(config, "latents_std", None) is not None
    )


def preview_steps(partial_images: int, total_steps: int) -> list[int]:
    """The 0-based steps after which to decode up to `partial_images` previews, evenly spaced,
    never the last."""
    if partial_images <= 0 or total_steps <= 1:
        return []
    ends = {round(total_steps * (k + 1) / (partial_images + 1)) for k in range(partial_images)}
    return sorted(end - 1 for end in ends if 1 <= end < total_steps)


def decode_previews(pipe: Any, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    """`latents` (a slice of the batch's) decoded as the pipeline decodes its final latents."""
    vae = pipe.vae
    unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    unpacked = unpacked.to(vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(unpacked.device, unpacked.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape)
    inv_std = inv_std.to(unpacked.device, unpacked.dtype)
    decoded = vae.decode(unpacked / inv_std + mean, return_dict=False)[0][:, :, 0]
    images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
    return images
