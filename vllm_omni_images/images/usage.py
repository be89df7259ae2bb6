"""The `usage` of an images response, in OpenAI's shape, counted for a diffusion model
(docs/image_api.md, "Usage"):

- text tokens: the prompt's, and the negative prompt's when one is sent, as the model's text
  encoder's tokenizer counts them (`engine.prompt_tokens`; its special tokens and the
  pipeline's prompt template left out);
- image tokens: an image in latent patches, one per `size_multiple` x `size_multiple` pixels of
  the size it is generated or edited at (16 x 16 for Qwen-Image, FLUX.1, SD3 and Z-Image: their
  VAE's 8x and the transformer's 2x2 patches). An edit's or variation's input image counts as
  input, once, at the size it is resized to; each of the `n` output images counts as output.
"""

from __future__ import annotations

from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.prompt_tokens import PromptTokenCounter
from vllm_omni_images.images.protocol import ImageUsage, UsageTokenDetails


def image_tokens(width: int, height: int, patch: int) -> int:
    """An image of `width` x `height` pixels in latent patches of `patch` pixels a side."""
    return (width // patch) * (height // patch)


def image_usage(work: EngineRequest, counter: PromptTokenCounter, patch: int) -> ImageUsage:
    """The usage of `work`, whose images are made of `patch`-pixel latent patches."""
    text = counter.count(work.prompt) + counter.count(work.negative_prompt or "")
    per_image = image_tokens(work.width, work.height, patch)
    input_images = per_image if work.image is not None else 0
    output_images = per_image * work.num_images
    return ImageUsage(
        input_tokens=text + input_images,
        input_tokens_details=UsageTokenDetails(text_tokens=text, image_tokens=input_images),
        output_tokens=output_images,
        output_tokens_details=UsageTokenDetails(image_tokens=output_images),
        total_tokens=text + input_images + output_images,
    )
