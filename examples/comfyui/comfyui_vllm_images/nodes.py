"""The ComfyUI nodes: "vLLM Image Generate" and "vLLM Image Edit" (and, from `lora_stack`,
"vLLM Image LoRA", whose stack of adapters they take).

They use ComfyUI's V1 node convention (a class with `INPUT_TYPES`, `RETURN_TYPES`, `FUNCTION`,
listed in `NODE_CLASS_MAPPINGS`), which needs nothing imported from ComfyUI: see the package
README ("Why the V1 node convention"). ComfyUI's `IMAGE` is a float32 tensor `[B, H, W, 3]` in
0..1 and its `MASK` a float tensor `[B, H, W]` (or `[H, W]`) in 0..1 where 1 marks what to change.
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (torch's own spelling)
from PIL import Image

from . import model_list
from .client import (
    MAX_IMAGES_PER_REQUEST,
    SERVER_URL_ENV_VAR,
    Cancelled,
    ImagesClient,
    default_server_url,
    request_seed,
)
from .lora_stack import LORA_SCALE_RANGE, STACK_TYPE, LoRAStack, VLLMImageLoRA, lora_field
from .model_list import SERVER_DEFAULT_MODEL, accepts_model

CATEGORY = "image/vLLM"
SIZE_STEP = 16
"""Width and height step: Qwen-Image, FLUX and SD3 need multiples of 16."""
MAX_SIDE = 4096
"""The server takes at most 2048x2048 pixels in all (so one side may reach 4096) and input
images up to 4096x4096; it answers a size it cannot make with a message saying why."""
MAX_BATCH = 64
"""Images per node run; sent as requests of at most `MAX_IMAGES_PER_REQUEST` (the API's cap
on `n`), whose seeds continue one another, so a batch is the same however it is split."""
MAX_STEPS = 200
SEED_MAX = 0xFFFFFFFFFFFFFFFF
DEFAULT_LORA_SCALE = 1.0
"""The adapter's full strength, the server's default: not sent (see `_fields`)."""

ImageTensor = torch.Tensor


def _server_inputs() -> dict[str, Any]:
    return {
        "server_url": (
            "STRING",
            {
                "default": default_server_url(),
                "tooltip": "The vLLM server: `vllm serve <model> --task image` (with or "
                f"without /v1). New nodes start with ${SERVER_URL_ENV_VAR}, else "
                "http://127.0.0.1:8000.",
            },
        ),
    }


def _prompt_inputs() -> dict[str, Any]:
    return {
        "prompt": (
            "STRING",
            {"multiline": True, "dynamicPrompts": True, "tooltip": "What to draw."},
        ),
        "negative_prompt": (
            "STRING",
            {
                "multiline": True,
                "dynamicPrompts": True,
                "default": "",
                "tooltip": "What not to draw. With true_cfg_scale above 1 it turns on true "
                "classifier-free guidance (twice the work per step). Empty: none.",
            },
        ),
    }


def _knob_inputs() -> dict[str, Any]:
    return {
        "steps": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": MAX_STEPS,
                "tooltip": "Denoising steps. 0: the served model's default (50 for Qwen-Image).",
            },
        ),
        "true_cfg_scale": (
            "FLOAT",
            {
                "default": 4.0,
                "min": 0.0,
                "max": 20.0,
                "step": 0.1,
                "round": 0.01,
                "tooltip": "True classifier-free guidance strength; sent only with a "
                "negative prompt (without one there is nothing to guide away from).",
            },
        ),
        "seed": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": SEED_MAX,
                "control_after_generate": True,
                "tooltip": "The same seed and settings give the same images. Image i of the "
                "batch uses seed + i.",
            },
        ),
        "batch_size": (
            "INT",
            {
                "default": 1,
                "min": 1,
                "max": MAX_BATCH,
                "tooltip": "How many images to make (per input image, when editing).",
            },
        ),
    }


def _optional_inputs() -> dict[str, Any]:
    return {
        "api_key": (
            "STRING",
            {
                "default": "",
                "tooltip": "The server's --api-key. Leave empty to use VLLM_API_KEY or "
                "OPENAI_API_KEY from ComfyUI's environment: a key typed here is saved in the "
                "workflow and in the metadata of every PNG that SaveImage writes.",
            },
        ),
        "model": (
            model_list.MODELS.choices(),
            {
                "default": SERVER_DEFAULT_MODEL,
                "tooltip": f"The served model or LoRA adapter to use. {SERVER_DEFAULT_MODEL}: "
                "the server's base model. The list is /v1/models of "
                f"${SERVER_URL_ENV_VAR} (else http://127.0.0.1:8000), read when the page loads "
                "and when node definitions are refreshed (R); a name that is not listed is "
                "still sent, and the server says if it does not serve it.",
            },
        ),
        "lora_scale": (
            "FLOAT",
            {
                "default": DEFAULT_LORA_SCALE,
                "min": -LORA_SCALE_RANGE,
                "max": LORA_SCALE_RANGE,
                "step": 0.01,
                "tooltip": "The LoRA adapter's strength, when model is an adapter. 1.0: its "
                "full strength (not sent). Another value is sent as lora_scale, and the "
                "server refuses it for a base model rather than ignore it.",
            },
        ),
        "lora_stack": (
            STACK_TYPE,
            {
                "tooltip": "LoRA adapters from vLLM Image LoRA nodes, applied together (and "
                "with the adapter that model names, if any); sent as the request's lora list. "
                "The server applies at most its --max-loras adapters to one request.",
            },
        ),
    }


class VLLMImageGenerate:
    """Text to image through `POST /v1/images/generations`."""

    DESCRIPTION = (
        "Generates images on a vLLM server (`vllm serve <model> --task image`) through the "
        "OpenAI Images API."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The generated images, batch_size of them.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:  # noqa: N802  (ComfyUI's name)
        size = {"min": SIZE_STEP, "max": MAX_SIDE, "step": SIZE_STEP}
        return {
            "required": {
                **_server_inputs(),
                **_prompt_inputs(),
                "width": ("INT", {"default": 1024, **size, "tooltip": "Image width in pixels."}),
                "height": (
                    "INT",
                    {"default": 1024, **size, "tooltip": "Image height in pixels."},
                ),
                **_knob_inputs(),
            },
            "optional": _optional_inputs(),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: object = SERVER_DEFAULT_MODEL) -> bool | str:  # noqa: N802
        return accepts_model(model)

    def generate(
        self,
        server_url: str,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        steps: int,
        true_cfg_scale: float,
        seed: int,
        batch_size: int,
        api_key: str = "",
        model: str = SERVER_DEFAULT_MODEL,
        lora_scale: float = DEFAULT_LORA_SCALE,
        lora_stack: LoRAStack | None = None,
    ) -> tuple[ImageTensor]:
        client = _client(server_url, api_key)
        fields = _fields(
            prompt, negative_prompt, steps, true_cfg_scale, model, lora_scale, lora_stack
        )
        fields["size"] = f"{width}x{height}"
        images: list[bytes] = []
        for offset, n in _chunks(batch_size):
            chunk = {**fields, "n": n, "seed": request_seed(seed + offset)}
            images += _run(functools.partial(client.generate, chunk))
        return (images_to_tensor(images),)


class VLLMImageEdit:
    """Image (and mask) to image through `POST /v1/images/edits`."""

    DESCRIPTION = (
        "Edits images on a vLLM server (`vllm serve <model> --task image`) through the OpenAI "
        "Images API: with a mask, only the masked area changes (inpainting); without one, the "
        "whole image (image to image). Each image of the input batch is edited on its own."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The edited images: batch_size per input image, in input order.",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:  # noqa: N802  (ComfyUI's name)
        size = {"min": 0, "max": MAX_SIDE, "step": SIZE_STEP}
        auto = (
            " 0 (both): the input's size, rounded down to what the model can make (a multiple "
            "of 16 for Qwen-Image; scaled down beyond 2048x2048 pixels)."
        )
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The images to edit."}),
                **_server_inputs(),
                **_prompt_inputs(),
                "width": ("INT", {"default": 0, **size, "tooltip": "Output width." + auto}),
                "height": ("INT", {"default": 0, **size, "tooltip": "Output height." + auto}),
                **_knob_inputs(),
                "strength": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "How far the result may move from the input (1: all the "
                        "way). 0: the model's default (0.6 for Qwen-Image).",
                    },
                ),
            },
            "optional": {
                "mask": (
                    "MASK",
                    {
                        "tooltip": "Where to edit (1 = change, 0 = keep), scaled to the "
                        "image's size; none: the whole image."
                    },
                ),
                **_optional_inputs(),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: object = SERVER_DEFAULT_MODEL) -> bool | str:  # noqa: N802
        return accepts_model(model)

    def edit(
        self,
        image: ImageTensor,
        server_url: str,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        steps: int,
        true_cfg_scale: float,
        seed: int,
        batch_size: int,
        strength: float = 0.0,
        mask: torch.Tensor | None = None,
        api_key: str = "",
        model: str = SERVER_DEFAULT_MODEL,
        lora_scale: float = DEFAULT_LORA_SCALE,
        lora_stack: LoRAStack | None = None,
    ) -> tuple[ImageTensor]:
        if (width == 0) != (height == 0):
            raise ValueError("Set both width and height, or both to 0 for the input image's size.")
        client = _client(server_url, api_key)
        fields = _fields(
            prompt, negative_prompt, steps, true_cfg_scale, model, lora_scale, lora_stack
        )
        fields["size"] = f"{width}x{height}" if width else "auto"
        if strength > 0:
            fields["strength"] = strength
        images = _image_batch(image)
        masks = None if mask is None else _mask_batch(mask)
        # One edit per input image (and per mask, when there are more masks than images):
        # nothing in a batch is dropped, and each image is edited as it would be alone.
        edits = max(len(images), 1 if masks is None else len(masks))
        results: list[bytes] = []
        for index in range(edits):
            source = images[index % len(images)]
            height_px, width_px = source.shape[0], source.shape[1]
            image_png = image_to_png(source)
            mask_png = None
            if masks is not None:
                mask_png = mask_to_png(masks[index % len(masks)], width_px, height_px)
            for offset, n in _chunks(batch_size):
                chunk = {**fields, "n": n, "seed": request_seed(seed + offset)}
                results += _run(functools.partial(client.edit, chunk, image_png, mask_png))
        return (images_to_tensor(results),)


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "VLLMImageGenerate": VLLMImageGenerate,
    "VLLMImageEdit": VLLMImageEdit,
    "VLLMImageLoRA": VLLMImageLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "VLLMImageGenerate": "vLLM Image Generate",
    "VLLMImageEdit": "vLLM Image Edit",
    "VLLMImageLoRA": "vLLM Image LoRA",
}


# Tensors and PNGs.


def images_to_tensor(pngs: list[bytes]) -> ImageTensor:
    """Encoded images as ComfyUI's `IMAGE`: float32 `[B, H, W, 3]` in 0..1."""
    arrays = []
    for data in pngs:
        with Image.open(io.BytesIO(data)) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    sizes = {array.shape for array in arrays}
    if len(sizes) > 1:
        raise ValueError(f"The server returned images of different sizes: {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays))


def image_to_png(image: torch.Tensor) -> bytes:
    """One ComfyUI image, `[H, W, C]` in 0..1, as a PNG (RGB; an alpha channel is dropped)."""
    pixels = _to_uint8(image)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return _png(Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB"))


def mask_to_png(mask: torch.Tensor, width: int, height: int) -> bytes:
    """ComfyUI's mask (`[H, W]`, 1 = change) as OpenAI's: a PNG `width` x `height` whose
    transparent pixels are edited (alpha = 1 - mask; a soft mask stays soft)."""
    mask = mask.detach().to("cpu", torch.float32)
    if tuple(mask.shape) != (height, width):
        mask = F.interpolate(mask[None, None], size=(height, width), mode="bilinear")[0, 0]
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[..., 3] = _to_uint8(1.0 - mask.clamp(0.0, 1.0))
    return _png(Image.fromarray(rgba, "RGBA"))


def _image_batch(image: torch.Tensor) -> list[torch.Tensor]:
    if image.ndim == 3:  # one image without its batch dimension
        image = image[None]
    if image.ndim != 4 or image.shape[0] == 0:
        raise ValueError(f"image must be ComfyUI's IMAGE [B, H, W, 3], got {tuple(image.shape)}")
    return list(image)


def _mask_batch(mask: torch.Tensor) -> list[torch.Tensor]:
    if mask.ndim < 2:
        raise ValueError(f"mask must be ComfyUI's MASK [B, H, W], got {tuple(mask.shape)}")
    return list(mask.reshape(-1, mask.shape[-2], mask.shape[-1]))


def _to_uint8(values: torch.Tensor) -> np.ndarray:
    scaled = (values.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0).round()
    return scaled.to(torch.uint8).numpy()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# Requests.


def _client(server_url: str, api_key: str) -> ImagesClient:
    return ImagesClient(server_url, api_key, should_stop=_comfy_interrupted())


def _fields(
    prompt: str,
    negative_prompt: str,
    steps: int,
    true_cfg_scale: float,
    model: str,
    lora_scale: float = DEFAULT_LORA_SCALE,
    lora_stack: LoRAStack | None = None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": prompt, "response_format": "b64_json"}
    lora = lora_field(lora_stack)
    if lora is not None:
        fields["lora"] = lora
    # "" is what workflows saved before the picker hold for the server's model.
    if model.strip() not in ("", SERVER_DEFAULT_MODEL):
        fields["model"] = model.strip()
    # Sent when it differs from the adapter's full strength, whatever the model: the server
    # refuses it without an adapter, so a strength set for a base model is reported, not
    # silently dropped, and no /v1/models lookup is needed to tell adapters apart.
    if lora_scale != DEFAULT_LORA_SCALE:
        fields["lora_scale"] = lora_scale
    if negative_prompt.strip():
        fields["negative_prompt"] = negative_prompt
        fields["true_cfg_scale"] = true_cfg_scale
    if steps > 0:
        fields["num_inference_steps"] = steps
    return fields


def _chunks(batch_size: int) -> list[tuple[int, int]]:
    """`(seed offset, n)` of each request that makes `batch_size` images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [
        (start, min(MAX_IMAGES_PER_REQUEST, batch_size - start))
        for start in range(0, batch_size, MAX_IMAGES_PER_REQUEST)
    ]


def _comfy_interrupted() -> Callable[[], bool] | None:
    """ComfyUI's "cancel" flag, when running inside ComfyUI (nothing is imported otherwise)."""
    model_management = sys.modules.get("comfy.model_management")
    check = getattr(model_management, "processing_interrupted", None)
    return check if callable(check) else None


def _run(request: Callable[[], list[bytes]]) -> list[bytes]:
    """`request()`, turning a cancel into ComfyUI's own interruption (so the run stops as a
    cancelled run, not as a failed node)."""
    try:
        return request()
    except Cancelled:
        model_management = sys.modules.get("comfy.model_management")
        interrupt = getattr(model_management, "throw_exception_if_processing_interrupted", None)
        if callable(interrupt):
            interrupt()  # raises ComfyUI's InterruptProcessingException
        raise
