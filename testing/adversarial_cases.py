"""Issue 31's adversarial cases against a live `vllm serve <model> --task image`: each case
sends what an attacker would and returns what came back as `Row`s (what was sent, the status,
an excerpt of the answer, the seconds it took, notes), with the response for a test to check.

`benchmarks/adversarial.py` runs them all and writes the before/after table of
docs/reliability.md; `tests/e2e/test_adversarial.py` runs the quick ones and asserts the
contract the issue asks for. The LoRA cases are in `testing/adversarial_lora.py`, the slow
network ones in `testing/adversarial_network.py`.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from testing import adversarial_inputs as inputs

FAST = {"size": "64x64", "num_inference_steps": 2}
SURROGATE = "\ud800"
"""A lone surrogate: valid JSON (`"\\ud800"`), but no tokenizer can encode it."""
ANSWER_CHARS = 160


@dataclass(frozen=True)
class Target:
    """The server under test and what the cases need beside it."""

    base_url: str
    headers: dict[str, str]
    workdir: Path
    """Where the cases write their files (adapters, images)."""
    adapter_source: Path
    """A LoRA adapter folder of the served model (`testing/tiny_lora.py`)."""
    max_cpu_loras: int = 2
    """The server's `--max-cpu-loras`: how many other adapters push one out of its cache."""
    timeout_s: float = 200.0
    """The longest a case waits for one answer (a slower one is recorded as a timeout)."""
    slow_client_cap_s: float = 150.0
    """How long a slow client is held open, waiting for the server to close it: past the
    server's default deadlines (`--image-body-timeout`, 120 s), so that its answer is seen."""


@dataclass
class Row:
    """One line of the adversarial table."""

    case: str
    point: int
    """The numbered point of issue 31 the case belongs to."""
    sent: str
    status: str
    """The HTTP status, or what happened instead (`timeout after 200 s`, `skipped: ...`)."""
    answer: str
    seconds: float | None
    notes: str = ""
    response: httpx.Response | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        del row["response"]
        return row


Case = Callable[[Target], list[Row]]


def send(
    target: Target, method: str, path: str, timeout_s: float | None = None, **kwargs: Any
) -> tuple[httpx.Response | None, str, float]:
    """(the response or None, its status or what happened instead, seconds)."""
    timeout = timeout_s or target.timeout_s
    headers = {**target.headers, **kwargs.pop("headers", {})}
    start = time.perf_counter()
    try:
        response = httpx.request(
            method, f"{target.base_url}{path}", headers=headers, timeout=timeout, **kwargs
        )
    except httpx.TimeoutException:
        return None, f"timeout after {timeout:.0f} s", round(time.perf_counter() - start, 2)
    except httpx.HTTPError as error:
        return None, f"{type(error).__name__}: {error}", round(time.perf_counter() - start, 2)
    return response, str(response.status_code), round(time.perf_counter() - start, 2)


def post_json(target: Target, path: str, body: dict[str, Any], **kwargs: Any) -> Any:
    """`send` with `body` as JSON text, lone surrogates written as `\\ud800` escapes (as
    `json.dumps` writes them; httpx's own encoder cannot)."""
    headers = {"Content-Type": "application/json"}
    return send(target, "POST", path, content=json.dumps(body).encode(), headers=headers, **kwargs)


def describe(response: httpx.Response | None) -> str:
    """What came back, short: an error's message, the images' count and size, the events."""
    if response is None:
        return ""
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        events = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
        return f"event stream: {', '.join(events)}"[:ANSWER_CHARS]
    if content_type.startswith("image/"):
        return f"{content_type}, {len(response.content)} bytes"
    try:
        body = response.json()
    except ValueError:
        return response.text[:ANSWER_CHARS]
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        return f"{len(body['data'])} image(s) of {body.get('size')}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))[:ANSWER_CHARS]
    return response.text[:ANSWER_CHARS]


def row(case: str, point: int, sent: str, result: tuple, notes: str = "") -> Row:
    response, status, seconds = result
    return Row(case, point, sent, status, describe(response), seconds, notes, response)


def first_image(response: httpx.Response | None) -> Image.Image | None:
    if response is None or response.status_code != 200:
        return None
    return Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))


def metric_total(target: Target, name: str) -> float:
    """The sum of `name`'s samples over its labels in `/metrics`."""
    text = httpx.get(f"{target.base_url}/metrics", timeout=30).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith((f"{name}{{", f"{name} "))
    )


def generation_with(name: str, point: int, field_name: str, value: Any) -> Case:
    """A small generation with `field_name` set to `value` (escaped as JSON escapes it)."""

    def case(target: Target) -> list[Row]:
        body = {"prompt": "a lighthouse", **FAST, field_name: value}
        result = post_json(target, "/v1/images/generations", body)
        return [row(name, point, f"generation, {json.dumps({field_name: value})}", result)]

    case.__name__ = name
    return case


# 1. A lone surrogate in a text field.


def surrogate_in(field_name: str) -> Case:
    return generation_with(f"surrogate_in_{field_name}", 1, field_name, SURROGATE)


def surrogate_beside_a_good_request(target: Target) -> list[Row]:
    """A bad and a good request that queue together behind a running one, so that they run as
    one batch (same size and steps, both with a negative prompt)."""
    busy = {"prompt": "keeps the engine busy", "size": "128x128", "num_inference_steps": 8}
    good = {"prompt": "a lighthouse", **FAST, "negative_prompt": "blurry", "seed": 3}
    bad = {**good, "negative_prompt": SURROGATE, "seed": 2}
    calls_before = metric_total(target, "vllm:image_batch_size_count")
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post_json, target, "/v1/images/generations", busy)
        time.sleep(0.5)
        bad_result = pool.submit(post_json, target, "/v1/images/generations", bad)
        good_result = pool.submit(post_json, target, "/v1/images/generations", good)
        running.result()
        bad_sent = "negative_prompt \\ud800, queued beside a good request"
        good_sent = 'the good request queued beside it (negative_prompt "blurry")'
        rows = [
            row("surrogate_beside_good:bad", 1, bad_sent, bad_result.result()),
            row("surrogate_beside_good:good", 1, good_sent, good_result.result()),
        ]
    calls = metric_total(target, "vllm:image_batch_size_count") - calls_before
    rows[1].notes = f"{calls:.0f} pipeline calls for the 3 requests (the busy one included)"
    return rows


# 2. Sizes beyond what the model can position-encode.


def edit_size_auto(width: int, height: int) -> Case:
    def case(target: Target) -> list[Row]:
        image = inputs.plain_png(width, height)
        files = {"image": ("long.png", image, "image/png")}
        data = {"prompt": "x", "size": "auto", "num_inference_steps": "2"}
        result = send(target, "POST", "/v1/images/edits", files=files, data=data)
        sent = f"edit, size auto, a {width}x{height} PNG ({len(image) // 1024} KB)"
        return [row(f"edit_auto_{width}x{height}", 2, sent, result)]

    case.__name__ = f"edit_auto_{width}x{height}"
    return case


def generation_beyond_the_side(target: Target) -> list[Row]:
    body = {"prompt": "x", "size": "16x98304", "num_inference_steps": 2}
    result = post_json(target, "/v1/images/generations", body)
    sent = "generation, size 16x98304 (1.6 M pixels: within --image-max-pixels)"
    return [row("generation_16x98304", 2, sent, result)]


# 3. One request that takes most of the machine's memory.


def largest_default_request(target: Target) -> list[Row]:
    body = {"prompt": "x", "size": "2048x2048", "n": 4, "num_inference_steps": 2}
    result = post_json(target, "/v1/images/generations", body, timeout_s=max(600, target.timeout_s))
    sent = "generation, 2048x2048, n 4, 2 steps (within the default limits)"
    return [row("generation_2048x2048_n4", 3, sent, result)]


# 5. Input images as a photo viewer shows them.


def _edit(target: Target, image: bytes, mask: bytes | None, name: str = "in.png") -> Any:
    files = {"image": (name, image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    data = {"prompt": "x", "seed": "1", "num_inference_steps": "2"}
    return send(target, "POST", "/v1/images/edits", files=files, data=data)


KEPT = (0, 0, 16, 16)
"""The top-left corner: kept (opaque) in every mask below, so the result holds the input's
pixels there as the server read them."""


def exif_mask_as_displayed(target: Target) -> list[Row]:
    """A JPEG stored 64x32 with EXIF Orientation 6 (shown 32x64, red on top) and a mask drawn
    on the image as shown (32x64)."""
    mask = inputs.hole_mask(32, 64, (16, 48, 32, 64))
    result = _edit(target, inputs.exif_rotated_jpeg(), mask, "photo.jpg")
    image = first_image(result[0])
    notes = ""
    if image is not None:
        notes = f"result {image.size[0]}x{image.size[1]}; top-left kept area mean RGB "
        notes += f"{inputs.mean_rgb(image, KEPT)} (red {inputs.RED} as shown)"
    sent = "edit, EXIF Orientation 6 JPEG (stored 64x32, shown 32x64) + 32x64 mask"
    return [row("exif_mask_as_displayed", 5, sent, result, notes)]


def exif_without_mask(target: Target) -> list[Row]:
    result = _edit(target, inputs.exif_rotated_jpeg(), None, "photo.jpg")
    sent = "edit, EXIF Orientation 6 JPEG (stored 64x32, shown 32x64), size auto"
    return [row("exif_size_auto", 5, sent, result, "shown as 32x64")]


def kept_colour(target: Target, image: bytes, name: str) -> tuple[tuple, tuple | None]:
    """The edit's result and the mean RGB of a kept area (None without an image)."""
    result = _edit(target, image, inputs.hole_mask(64, 64, (32, 32, 64, 64)), name)
    edited = first_image(result[0])
    return result, None if edited is None else inputs.mean_rgb(edited, KEPT)


def gray16_brightness(target: Target) -> list[Row]:
    data, shown = inputs.gray16_png()
    result, kept = kept_colour(target, data, "gray16.png")
    notes = f"kept area mean RGB {kept}; the input shows {shown:.1f}"
    sent = "edit, 16-bit grayscale PNG (level 20000/65535) + mask"
    return [row("gray16_png", 5, sent, result, notes)]


def other_mode(mode: str) -> Case:
    def case(target: Target) -> list[Row]:
        data, shown = inputs.mode_png_or_jpeg(mode)
        result, kept = kept_colour(target, data, "in.jpg" if mode == "CMYK" else "in.png")
        shown_text = tuple(round(c, 1) for c in shown)
        notes = f"kept area mean RGB {kept}; the input shows {shown_text}"
        kind = "JPEG" if mode == "CMYK" else "PNG"
        return [row(f"mode_{mode}", 5, f"edit, {mode} {kind} + mask", result, notes)]

    case.__name__ = f"mode_{mode}"
    return case


# 7. Smaller ones.


def unreadable_image_message(target: Target) -> list[Row]:
    files = {"image": ("x.png", b"not an image at all", "image/png")}
    result = send(target, "POST", "/v1/images/edits", files=files, data={"prompt": "x"})
    return [row("unreadable_image_message", 7, "edit, an image part that is text", result)]


def bad_file_names(target: Target) -> list[Row]:
    rows = []
    for name in ("a/b.png", "..%2F..%2Fetc%2Fpasswd"):
        result = send(target, "GET", f"/images/files/{name}", timeout_s=30)
        rows.append(row(f"files_bad_name:{name}", 7, f"GET /images/files/{name}", result))
    return rows


def head_on_an_image_url(target: Target) -> list[Row]:
    body = {"prompt": "x", **FAST, "response_format": "url"}
    response, _, _ = post_json(target, "/v1/images/generations", body)
    url = response.json()["data"][0]["url"] if response is not None else ""
    result = send(target, "HEAD", url.removeprefix(target.base_url), timeout_s=30)
    got = send(target, "GET", url.removeprefix(target.base_url), timeout_s=30)
    return [row("head_image_url", 7, "HEAD on an image URL", result, f"GET answers {got[1]}")]


def wrong_json_type(field_name: str, value: Any) -> Case:
    return generation_with(f"{field_name}_as_string", 7, field_name, value)
