"""`ImageLimits`: the `--image-max-*` flags' values, which a request is held to before any
work is done for it (docs/architecture.md, "The request path", says where each is checked)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MiB = 1024 * 1024

BodyKind = Literal["json", "form"]
"""Which body limit a route's body is held to."""

EDIT_INPUT_IMAGES = 1
"""The images one edit or variation can use (`EngineRequest.image`: one)."""


@dataclass(frozen=True)
class ImageLimits:
    """What one request may ask for and send; the defaults are the flags' defaults."""

    max_json_bytes: int = MiB
    max_form_bytes: int | None = None
    """`None`: see `form_bytes`."""
    max_prompt_chars: int = 32_000
    """`prompt` and `negative_prompt`, each."""
    max_pixels: int | None = None
    """Of one output image; `None`: the model's own (`ModelDefaults.max_pixels`)."""
    max_request_pixels: int = 4 * 2048 * 2048
    """`n` x width x height of one request."""
    max_input_images: int = EDIT_INPUT_IMAGES
    max_input_bytes: int = 20 * MiB
    """One input image or mask, encoded."""
    max_input_pixels: int = 4096 * 4096
    """One input image or mask, read from its header."""
    max_loras: int = 1
    """LoRA adapters one request may apply together (`--max-loras`: a stack is loaded at
    once)."""
    body_timeout_s: float | None = 120.0
    """Seconds a request's whole body may take to arrive, from its head's arrival; `None`: no
    deadline."""

    @property
    def input_images(self) -> int:
        """`max_input_images`, at most `EDIT_INPUT_IMAGES`."""
        return min(self.max_input_images, EDIT_INPUT_IMAGES)

    @property
    def form_bytes(self) -> int:
        """The form body limit: as set, or room for the inputs and a mask at their largest as
        `data:` URLs, plus 1 MiB."""
        if self.max_form_bytes is not None:
            return self.max_form_bytes
        return (self.input_images + 1) * 2 * self.max_input_bytes + MiB

    @property
    def form_files(self) -> int:
        """Files the form parser reads: twice the inputs and a mask, so that a few too many
        are refused by name once counted, and only a flood is cut short by the parser."""
        return 2 * (self.input_images + 1)

    @property
    def form_field_bytes(self) -> int:
        """One text field of a form: room for a `data:` URL of the largest input."""
        return 2 * self.max_input_bytes + 64 * 1024

    def body_bytes(self, kind: BodyKind) -> tuple[int, str]:
        """The limit for a body of `kind`, and the flag that sets it."""
        if kind == "json":
            return self.max_json_bytes, "--image-max-json-mb"
        return self.form_bytes, "--image-max-form-mb"


DEFAULT_LIMITS = ImageLimits()


def size_text(num_bytes: int) -> str:
    """`1048576` -> `1 MiB`; `1536` -> `1536 bytes`."""
    if num_bytes >= MiB:
        return f"{num_bytes / MiB:g} MiB"
    return f"{num_bytes} bytes"
