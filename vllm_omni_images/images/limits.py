"""The limits a request is held to before any work is done for it.

Every limit is a `vllm serve` flag (`server/cli_args.py`); `ImageLimits` carries their values
to the routes and the serving object. Each is checked as early as what it bounds is known:

- **the body**, before it is read, and **query parameters**: by the route guard
  (`request_guard.py`), from `body_bytes`;
- **form parts** (count, size of each text field): Starlette's own `request.form()` options,
  set from these limits in `edits.py`; the image parts are counted before any is decoded, and
  each image is checked against its byte and pixel limits from its header, before it is
  decoded;
- **prompts and pixels**: as the request is mapped to engine work (`request_mapping.py`),
  before the engine sees it: a 400 naming `prompt`, `size` or `n`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MiB = 1024 * 1024

BodyKind = Literal["json", "form"]
"""Which body limit a route's body is held to."""

EDIT_INPUT_IMAGES = 1
"""The images one edit or variation can use: every engine here edits one image per request
(`EngineRequest.image`). `--image-max-input-images` can only lower it."""


@dataclass(frozen=True)
class ImageLimits:
    """What one request may ask for and send; the defaults are the flags' defaults."""

    max_json_bytes: int = MiB
    """A JSON body (generations). Two prompts at the limit, every character escaped, fit."""
    max_form_bytes: int | None = None
    """A form body (edits, variations); `None`: room for the allowed inputs and a mask at
    their largest (see `form_bytes`)."""
    max_prompt_chars: int = 32_000
    """`prompt` and `negative_prompt`, each."""
    max_pixels: int | None = None
    """Width x height of one output image; `None`: the model's own limit
    (`ModelDefaults.max_pixels`, 2048x2048 unless its folder says otherwise)."""
    max_request_pixels: int = 4 * 2048 * 2048
    """`n` x width x height of one request: what its images cost the engine together."""
    max_input_images: int = EDIT_INPUT_IMAGES
    """Images one edit or variation may send (`--image-max-input-images`); it can only lower
    `EDIT_INPUT_IMAGES` (see `input_images`)."""
    max_input_bytes: int = 20 * MiB
    """One input image (or mask), encoded: a file, a `data:` URL's bytes, a fetched URL."""
    max_input_pixels: int = 4096 * 4096
    """One input image (or mask), read from its header before it is decoded."""

    @property
    def input_images(self) -> int:
        """The images one edit or variation may send: `max_input_images`, at most what the
        engines can edit (`EDIT_INPUT_IMAGES`)."""
        return min(self.max_input_images, EDIT_INPUT_IMAGES)

    @property
    def form_bytes(self) -> int:
        """The form body limit: as set, or room for the allowed inputs and a mask at their
        largest even as `data:` URLs (twice their bytes, as `form_field_bytes`), plus 1 MiB
        for the other text fields."""
        if self.max_form_bytes is not None:
            return self.max_form_bytes
        return (self.input_images + 1) * 2 * self.max_input_bytes + MiB

    @property
    def form_files(self) -> int:
        """Files one form may carry, as the form parser counts them while it reads: the
        allowed inputs and a mask, twice over, so that a form with a few too many (a second
        image, a second mask) is refused by name once its parts are counted, and only a flood
        of files is cut short by the parser."""
        return 2 * (self.input_images + 1)

    @property
    def form_field_bytes(self) -> int:
        """One text field of a form: room for a `data:` URL of the largest input (base64 is
        4/3 of the bytes; a urlencoded form escapes some of its characters again)."""
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
