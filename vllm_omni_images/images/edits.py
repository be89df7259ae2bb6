"""Reading the multipart bodies of `/v1/images/edits` and `/v1/images/variations`.

The `openai` SDK sends these as multipart/form-data: the images as files (`image`, or `image[]`
for several), the mask as a file (`mask`; vllm-omni's clients call it `mask_image`), every other
field as text. Each is checked before any work is queued:

1. sizes: at most `MAX_INPUT_IMAGES` images, each at most `MAX_INPUT_BYTES` (413 beyond) and
   `MAX_INPUT_PIXELS`;
2. content: PNG, JPEG or WebP that decodes completely (a truncated file is a 400 naming it);
3. the mask: a PNG with an alpha channel, the size of the first image; its transparent pixels
   are the ones to edit (OpenAI's rule), turned into the white-is-edited mask diffusers takes;
4. the text fields: validated by the request model, so a bad or unknown one is a 400 naming it.

Images given as `data:` URLs in a text field are read the same way. `http(s)` URLs are fetched
only through vLLM's own media fetching (`MediaConnector`, its timeouts and size limit), and only
when the operator named the hosts that may be fetched (vLLM's `--allowed-media-domains`);
otherwise they are a 400 that says so. The server never fetches what the operator did not allow.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.errors import PayloadTooLargeError

MAX_INPUT_IMAGES = 16
MAX_INPUT_BYTES = 20 * 1024 * 1024
MAX_INPUT_PIXELS = 4096 * 4096
INPUT_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELDS = ("mask", "mask_image")
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

_Request = TypeVar("_Request", bound=BaseModel)


@dataclass(frozen=True)
class ImageInputs:
    images: list[Image.Image]
    """RGB, in the order sent."""
    mask: Image.Image | None
    """`L`, white where the image is to be edited; the size of `images[0]`."""


RemoteImageFetcher = Callable[[str], Awaitable[Image.Image]]
"""Fetches an http(s) image URL (vLLM's `MediaConnector.fetch_image_async`); raises
`ValueError` or `OSError` for a URL it will not or cannot fetch."""


async def read_multipart(
    raw_request: Request,
    request_model: type[_Request],
    *,
    allow_mask: bool,
    fetch_remote: RemoteImageFetcher | None = None,
) -> tuple[_Request, ImageInputs]:
    """The request's fields as `request_model`, and its images (see the module docstring)."""
    content_type = raw_request.headers.get("content-type", "")
    if not content_type.startswith(FORM_CONTENT_TYPES):
        raise VLLMValidationError(
            "Send this endpoint multipart/form-data (the image as a file), as the openai SDK "
            "does, or a urlencoded form whose image is a data: or http(s) URL.",
            parameter="image",
        )
    try:
        form = await raw_request.form(max_files=MAX_INPUT_IMAGES + 2, max_fields=64)
    except HTTPException as error:  # Starlette's own limits and parse errors
        raise VLLMValidationError(f"The form could not be read: {error.detail}") from None
    fields: dict[str, str] = {}
    sources: list[UploadFile | str] = []
    mask_source: UploadFile | str | None = None
    for key, value in form.multi_items():
        if key in IMAGE_FIELDS:
            sources.append(value)
        elif key in MASK_FIELDS and allow_mask:
            mask_source = value
        elif isinstance(value, UploadFile):
            raise VLLMValidationError(f"{key} must not be a file.", parameter=key)
        else:
            fields[key] = value
    if not sources:
        raise VLLMValidationError("image is required: send the image to edit.", parameter="image")
    if len(sources) > MAX_INPUT_IMAGES:
        raise VLLMValidationError(
            f"At most {MAX_INPUT_IMAGES} images per request, got {len(sources)}.",
            parameter="image",
        )
    request = _validate(request_model, fields)
    images = [
        (await _read_image(source, "image", fetch_remote)).convert("RGB") for source in sources
    ]
    mask = None
    if mask_source is not None:
        mask = _edit_mask(await _read_image(mask_source, "mask", fetch_remote), images[0].size)
    return request, ImageInputs(images, mask)


def _validate(request_model: type[_Request], fields: dict[str, str]) -> _Request:
    try:
        return request_model.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        parameter = ".".join(str(part) for part in first["loc"]) or None
        raise VLLMValidationError(
            f"{parameter}: {first['msg']}" if parameter else first["msg"], parameter=parameter
        ) from None


async def _read_image(
    source: UploadFile | str, parameter: str, fetch_remote: RemoteImageFetcher | None
) -> Image.Image:
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return _within_pixel_cap(await _fetch(source, parameter, fetch_remote), parameter)
    data = await _read_bytes(source, parameter)
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in INPUT_FORMATS:
            raise VLLMValidationError(
                f"{parameter} must be a PNG, JPEG or WebP image, got {image.format}.",
                parameter=parameter,
            )
        _within_pixel_cap(image, parameter)
        image.load()  # decodes it all: a truncated file fails here, not in the engine
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, VLLMValidationError):
            raise
        raise VLLMValidationError(
            f"{parameter} is not a readable PNG, JPEG or WebP image ({error}).",
            parameter=parameter,
        ) from None
    return image


def _within_pixel_cap(image: Image.Image, parameter: str) -> Image.Image:
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        raise VLLMValidationError(
            f"{parameter} is {width}x{height}: at most {MAX_INPUT_PIXELS} pixels.",
            parameter=parameter,
        )
    return image


async def _fetch(url: str, parameter: str, fetch_remote: RemoteImageFetcher | None) -> Image.Image:
    if fetch_remote is None:
        raise VLLMValidationError(
            f"{parameter} as an http(s) URL is not allowed on this server: its operator has not "
            "named the hosts it may fetch from (vLLM's --allowed-media-domains). Send the file, "
            "or a data: URL.",
            parameter=parameter,
        )
    try:
        return await fetch_remote(url)
    except (ValueError, OSError) as error:  # a host not allowed, a failed fetch, not an image
        raise VLLMValidationError(
            f"{parameter} could not be fetched: {error}", parameter=parameter
        ) from None


async def _read_bytes(source: UploadFile | str, parameter: str) -> bytes:
    if isinstance(source, UploadFile):
        data = await source.read(MAX_INPUT_BYTES + 1)
    elif source.startswith("data:"):
        try:
            data = base64.b64decode(source.partition(",")[2], validate=True)
        except (binascii.Error, ValueError):
            raise VLLMValidationError(
                f"{parameter} is a data: URL whose base64 does not decode.", parameter=parameter
            ) from None
    else:
        raise VLLMValidationError(
            f"{parameter} must be an image file (or a data: URL).", parameter=parameter
        )
    if len(data) > MAX_INPUT_BYTES:
        raise PayloadTooLargeError(
            f"{parameter} is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MiB."
        )
    return data


def _edit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (transparent = edit) as diffusers' (white = edit)."""
    has_alpha = mask.mode in ("RGBA", "LA") or "transparency" in mask.info
    if mask.format != "PNG" or not has_alpha:
        raise VLLMValidationError(
            "mask must be a PNG with an alpha channel: its transparent pixels are edited.",
            parameter="mask",
        )
    if mask.size != size:
        raise VLLMValidationError(
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
            "they must match.",
            parameter="mask",
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda value: 255 - value)
