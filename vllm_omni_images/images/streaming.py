"""The server-sent events of `stream: true`, in OpenAI's shapes (docs/image_api.md)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_omni_images.engine.base import EngineRequest
    from vllm_omni_images.images.protocol import ImageGenerationRequest


def server_sent_event(data: dict[str, Any], event: str | None = None) -> str:
    name = event or data["type"]
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _image_fields(
    request: ImageGenerationRequest, work: EngineRequest, b64_json: str
) -> dict[str, Any]:
    return {
        "b64_json": b64_json,
        "size": f"{work.width}x{work.height}",
        "output_format": request.output_format,
        "quality": request.quality or "auto",
        "background": "opaque",
        "created_at": int(time.time()),
    }


def partial_image_event(
    kind: str, request: ImageGenerationRequest, work: EngineRequest, b64_json: str, index: int
) -> dict[str, Any]:
    """`kind` is `image_generation` or `image_edit`."""
    return {
        "type": f"{kind}.partial_image",
        "partial_image_index": index,
        **_image_fields(request, work, b64_json),
    }


def completed_event(
    kind: str,
    request: ImageGenerationRequest,
    work: EngineRequest,
    b64_json: str,
    usage: dict[str, Any],
) -> dict[str, Any]:
    """The stream's last event: the image, and the request's `usage` (as a response's)."""
    return {"type": f"{kind}.completed", **_image_fields(request, work, b64_json), "usage": usage}
