"""`read_multipart`: the multipart (or urlencoded) bodies of `/v1/images/edits` and
`/v1/images/variations`, checked before any work is queued (docs/image_api.md, "Edits").

Sizes (pixels, the 8:1 aspect bound, from each image's header) and counts are refused before
any image is decoded; an `http(s)` image URL is fetched only through `fetch_remote` (vLLM's
media fetching, `--allowed-media-domains`), else a 400. Every image and mask, sent or fetched,
is decoded by `input_images` as a photo viewer shows it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from PIL import Image, ImageOps
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.images.errors import PayloadTooLargeError, describe_validation_errors
from vllm_omni_images.images.input_images import alpha_channel, as_rgb, open_input
from vllm_omni_images.images.limits import DEFAULT_LIMITS, ImageLimits, size_text
from vllm_omni_images.images.protocol import ImageEditRequest
from vllm_omni_images.images.request_guard import BodyReadError
from vllm_omni_images.images.request_mapping import check_limits
from vllm_omni_images.images.safe_text import printable

MAX_FORM_FIELDS = 64
"""Text fields of one form: the request model has fewer than 40."""
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELDS = ("mask", "mask_image")
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
ONE_AT_A_TIME = "This model edits one image at a time"

_Request = TypeVar("_Request", bound=ImageEditRequest)


@dataclass(frozen=True)
class ImageInputs:
    images: list[Image.Image]
    """RGB as displayed (`input_images.as_rgb`), in the order sent: at most
    `ImageLimits.input_images` (one)."""
    mask: Image.Image | None
    """`L`, white where the image is to be edited; the size of `images[0]` as displayed."""


RemoteImageFetcher = Callable[[str], Awaitable[bytes]]
"""Fetches an http(s) image URL's bytes (decoded as an upload's are); raises `ValueError` or
`OSError` for one it will not or cannot."""


async def read_multipart(
    raw_request: Request,
    request_model: type[_Request],
    *,
    allow_mask: bool,
    fetch_remote: RemoteImageFetcher | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> tuple[_Request, ImageInputs]:
    """The request's fields as `request_model`, and its checked images; raises
    `VLLMValidationError` (400), `PayloadTooLargeError` (413) or `BodyReadError` (413, 408)."""
    content_type = raw_request.headers.get("content-type", "")
    if not content_type.startswith(FORM_CONTENT_TYPES):
        raise VLLMValidationError(
            "Send this endpoint multipart/form-data (the image as a file), as the openai SDK "
            "does, or a urlencoded form whose image is a data: or http(s) URL.",
            parameter="image",
        )
    try:
        form = await raw_request.form(
            max_files=limits.form_files,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=limits.form_field_bytes,
        )
    except BodyReadError:
        raise  # the body passed its limit or its deadline: answered by the route
    except HTTPException as error:  # Starlette's own limits and parse errors
        message = f"The form could not be read: {error.detail}"
        if str(error.detail).startswith("Too many files"):  # a flood of image parts
            raise VLLMValidationError(f"{message} {ONE_AT_A_TIME}.", parameter="image") from None
        raise VLLMValidationError(message) from None
    try:
        return await _read_form(form, request_model, allow_mask, fetch_remote, limits)
    finally:
        await form.close()  # the uploads' spooled files, at once


async def _read_form(
    form: FormData,
    request_model: type[_Request],
    allow_mask: bool,
    fetch_remote: RemoteImageFetcher | None,
    limits: ImageLimits,
) -> tuple[_Request, ImageInputs]:
    fields: dict[str, str] = {}
    sources: list[UploadFile | str] = []
    masks: list[UploadFile | str] = []
    for key, value in form.multi_items():
        name = printable(key, 64)
        if key in IMAGE_FIELDS:
            sources.append(value)
        elif key in MASK_FIELDS and allow_mask:
            masks.append(value)
        elif isinstance(value, UploadFile):
            raise VLLMValidationError(f"{name} must not be a file.", parameter=name)
        elif key in fields:  # one value would be dropped unread
            raise VLLMValidationError(f"{name} was sent more than once.", parameter=name)
        else:
            fields[key] = value
    if len(masks) > 1:
        raise VLLMValidationError("Send one mask, not several.", parameter="mask")
    mask_source = masks[0] if masks else None
    if not sources:
        raise VLLMValidationError("image is required: send the image to edit.", parameter="image")
    # Before any image is decoded: the fields (the model's validators refuse what this server
    # never honours), the prompt against the server's limits, then the images' count.
    request = _validate(request_model, fields)
    check_limits(request, limits)
    if len(sources) > limits.input_images:
        raise VLLMValidationError(
            f"{ONE_AT_A_TIME}; got {len(sources)}.",
            parameter="image",
        )
    # Decoding and conversion run in a worker thread: a large image takes the event loop
    # no time from other requests.
    images = [
        await asyncio.to_thread(as_rgb, await _read_image(source, "image", fetch_remote, limits))
        for source in sources
    ]
    mask = None
    if mask_source is not None:
        mask_image = await _read_image(mask_source, "mask", fetch_remote, limits)
        mask = await asyncio.to_thread(_edit_mask, mask_image, images[0].size)
    return request, ImageInputs(images, mask)


def _validate(request_model: type[_Request], fields: dict[str, str]) -> _Request:
    try:
        # A form's fields are strings: parsed (`"n": "2"`), where a JSON body is held strictly.
        return request_model.model_validate(fields, strict=False, context={"form": True})
    except ValidationError as error:
        message, parameter = describe_validation_errors(error.errors())
        raise VLLMValidationError(message, parameter=parameter) from None


async def _read_image(
    source: UploadFile | str,
    parameter: str,
    fetch_remote: RemoteImageFetcher | None,
    limits: ImageLimits,
) -> Image.Image:
    """The source decoded and upright (`input_images.open_input`), within the limits."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        data = await _fetch(source, parameter, fetch_remote)  # held to the byte limit (413)
    else:
        data = await _read_bytes(source, parameter, limits)
    return await asyncio.to_thread(open_input, data, parameter, limits.max_input_pixels)


async def _fetch(url: str, parameter: str, fetch_remote: RemoteImageFetcher | None) -> bytes:
    if fetch_remote is None:
        raise VLLMValidationError(
            f"{parameter} as an http(s) URL is not allowed on this server: its operator has not "
            "named the hosts it may fetch from (vLLM's --allowed-media-domains). Send the file, "
            "or a data: URL.",
            parameter=parameter,
        )
    try:
        return await fetch_remote(url)
    except PayloadTooLargeError:
        raise
    except (ValueError, OSError) as error:  # a host not allowed, a failed fetch, not an image
        raise VLLMValidationError(
            f"{parameter} could not be fetched: {printable(str(error), 300)}", parameter=parameter
        ) from None


async def _read_bytes(source: UploadFile | str, parameter: str, limits: ImageLimits) -> bytes:
    limit = limits.max_input_bytes
    if isinstance(source, UploadFile):
        data = await source.read(limit + 1)
    elif source.startswith("data:"):
        encoded = source.partition(",")[2]
        if len(encoded) > (limit + 2) // 3 * 4:  # refused before it is decoded
            raise PayloadTooLargeError(_too_large(parameter, limit))
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise VLLMValidationError(
                f"{parameter} is a data: URL whose base64 does not decode.", parameter=parameter
            ) from None
    else:
        raise VLLMValidationError(
            f"{parameter} must be an image file (or a data: URL).", parameter=parameter
        )
    if len(data) > limit:
        raise PayloadTooLargeError(_too_large(parameter, limit))
    return data


def _too_large(parameter: str, limit: int) -> str:
    return f"{parameter} is larger than {size_text(limit)} (--image-max-input-mb)."


def _edit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (transparent = edit) as diffusers' (white = edit); `size` and the mask's
    are as displayed (both upright)."""
    alpha = alpha_channel(mask) if mask.format == "PNG" else None
    if alpha is None:
        raise VLLMValidationError(
            "mask must be a PNG with an alpha channel: its transparent pixels are edited.",
            parameter="mask",
        )
    if mask.size != size:
        raise VLLMValidationError(
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]} "
            "(both as displayed, EXIF orientation applied); they must match.",
            parameter="mask",
        )
    return ImageOps.invert(alpha)
