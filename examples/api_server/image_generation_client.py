"""Generate or edit images on a `vllm serve <model> --task image` server with the `openai` SDK.

Start a server (`make serve`, or `vllm serve tiny-qwen-image --task image`), then:

    # one image, the model's default size
    python examples/api_server/image_generation_client.py --prompt "a lighthouse at dawn"

    # three 256x256 images, reproducible: dragon.png, dragon_1.png, dragon_2.png
    python examples/api_server/image_generation_client.py --prompt "a red dragon" \\
        --n 3 --size 256x256 --seed 42 --steps 20 --output dragon.png

    # true classifier-free guidance: a negative prompt with --cfg-scale above 1
    python examples/api_server/image_generation_client.py --prompt "a cat" \\
        --negative-prompt "blurry, low quality" --cfg-scale 4

    # edit an image; the mask's transparent pixels are repainted, the others kept
    python examples/api_server/image_generation_client.py --prompt "a red fox" \\
        --image photo.png --mask mask.png --output fox.png

    # stream: a line per partial image as the server sends it, then the final image
    python examples/api_server/image_generation_client.py --prompt "a boat" --stream

    # the server's models: the base model, then each LoRA adapter with its base model
    python examples/api_server/image_generation_client.py --list-models

    # a LoRA adapter (served by `vllm serve M --task image --enable-lora --lora-modules
    # style=/path/to/adapter`) is a model name; --lora-scale sets its strength (default 1.0)
    python examples/api_server/image_generation_client.py --prompt "a cat" \\
        --model style --lora-scale 0.7

    # several adapters applied together, each at its own strength (NAME or NAME:SCALE,
    # repeated; sent as the request's `lora` list); --model may name one more
    python examples/api_server/image_generation_client.py --prompt "a cat" \\
        --lora style:0.8 --lora character:0.6

    # another server, started with --api-key (or set OPENAI_API_KEY); its root or its /v1 URL
    python examples/api_server/image_generation_client.py --prompt "a boat" \\
        --base-url http://gpu-box:8000 --api-key secret

Only the options given are sent: the server's defaults apply to the rest, and the server
checks every value (an error prints the server's message and exits with status 1).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import openai
from openai.types import ImagesResponse, Model

# `--output` suffixes that ask the server for another encoding than PNG (its default).
OUTPUT_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def lora_choice(text: str) -> dict[str, Any]:
    """`--lora NAME[:SCALE]` as one entry of the request's `lora` list: `{"name": NAME}`, and
    `"scale"` when given (the server's default is 1.0). Adapter names hold no `:`."""
    name, _, scale = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} names no adapter: give NAME or NAME:SCALE")
    if ":" not in text:
        return {"name": name.strip()}
    try:
        return {"name": name.strip(), "scale": float(scale)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the scale after ':' must be a number, e.g. {name.strip()}:0.8"
        ) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--prompt", help="what to draw (or how to edit --image); required unless --list-models"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("image.png"),
        help="where to save the image (default: %(default)s); with several images the others "
        "get _1, _2, ... before the suffix. A .jpg/.jpeg/.webp suffix asks for that format",
    )
    parser.add_argument("--n", type=int, help="how many images (server default: 1)")
    parser.add_argument(
        "--size", help="WIDTHxHEIGHT, e.g. 512x512, or auto (server default: the model's)"
    )
    parser.add_argument(
        "--seed", type=int, help="same request + same seed = the same images (default: random)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (num_inference_steps)")
    parser.add_argument("--negative-prompt", help="what not to draw (negative_prompt)")
    parser.add_argument(
        "--cfg-scale",
        type=float,
        help="true classifier-free guidance strength (true_cfg_scale, e.g. 4.0 for Qwen-Image); "
        "takes effect with --negative-prompt and a value above 1",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="distilled guidance (guidance_scale), for pipelines with a guidance embedding",
    )
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        help="edit this image instead of generating one (PNG, JPEG or WebP); repeat it for "
        "several where the model takes several",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        help="with --image: a PNG with alpha, the image's size; its transparent pixels are edited",
    )
    parser.add_argument(
        "--strength", type=float, help="with --image: how far the edit may move from it (0-1]"
    )
    parser.add_argument(
        "--stream", action="store_true", help="stream, printing each partial image as it arrives"
    )
    parser.add_argument(
        "--partial-images",
        type=int,
        default=2,
        help="with --stream: previews sent before the image, 0-3 (default: %(default)s)",
    )
    parser.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1",
        help="the server's root (http://host:8000) or its /v1 URL (default: $OPENAI_BASE_URL, "
        "as for the openai SDK, else http://127.0.0.1:8000/v1)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY") or "EMPTY",
        help="the server's --api-key (default: $OPENAI_API_KEY, else none)",
    )
    parser.add_argument(
        "--model",
        help="a served model name or a LoRA adapter's (--list-models shows them; default: the "
        "server's base model)",
    )
    parser.add_argument(
        "--lora-scale",
        type=float,
        help="the LoRA adapter's strength (lora_scale; server default: 1.0); only with an "
        "adapter as --model: the server refuses it for a base model (--lora takes NAME:SCALE)",
    )
    parser.add_argument(
        "--lora",
        type=lora_choice,
        action="append",
        metavar="NAME[:SCALE]",
        help="apply this LoRA adapter (a served adapter's name) at SCALE (default 1.0); repeat "
        "it to stack adapters, applied together (sent as the request's lora list; the "
        "server's --max-loras caps how many, counting one that --model names)",
    )
    parser.add_argument(
        "--list-models",
        action="store_true",
        help="print the server's models (GET /v1/models), one a line: the base model's name, "
        "and each adapter's followed by the base model it adapts; then exit",
    )
    args = parser.parse_args(argv)
    if args.prompt is None and not args.list_models:
        parser.error("--prompt is required (unless --list-models)")
    if args.mask and not args.image:
        parser.error("--mask needs --image")
    return args


def api_url(base_url: str) -> str:
    """The server's OpenAI API URL: a server's root (`http://host:8000`, as vLLM's own examples
    and ComfyUI nodes take it) gets `/v1`; a URL with a path is used as given."""
    parts = urllib.parse.urlsplit(base_url.strip())
    if parts.scheme and parts.netloc and parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/v1"))
    return base_url


def model_lines(models: Iterable[Model]) -> list[str]:
    """`--list-models`' lines: a base model's name; an adapter's name and the base model it
    adapts (vLLM's model card gives an adapter a `parent`, a base model none). The name comes
    first so that `cut -d' ' -f1` gives the names alone."""
    lines = []
    for model in models:
        parent = model_parent(model)
        lines.append(model.id if parent is None else f"{model.id} (LoRA adapter of {parent})")
    return lines


def model_parent(model: Model) -> str | None:
    # `parent` is vLLM's field, not OpenAI's: the SDK keeps it as an extra attribute.
    parent = (model.model_extra or {}).get("parent")
    return str(parent) if parent else None


def base_model(client: openai.OpenAI) -> str | None:
    """The server's base model: the first model without a parent (vLLM lists the base models
    first, then the adapters); None leaves the choice to the server."""
    return next((model.id for model in client.models.list() if model_parent(model) is None), None)


def request_images(client: openai.OpenAI, args: argparse.Namespace) -> list[bytes]:
    """Send the request that the options describe; return the images' encoded bytes."""
    extensions = {
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "negative_prompt": args.negative_prompt,
        "true_cfg_scale": args.cfg_scale,
        "guidance_scale": args.guidance_scale,
        "strength": args.strength,
        "lora_scale": args.lora_scale,
    }
    fields: dict[str, Any] = {
        "model": args.model or base_model(client),
        "prompt": args.prompt,
        "n": args.n,
        "size": args.size,
        "output_format": OUTPUT_FORMATS.get(args.output.suffix.lower()),
    }
    fields = {name: value for name, value in fields.items() if value is not None}
    fields["extra_body"] = {name: value for name, value in extensions.items() if value is not None}
    fields["response_format"] = "b64_json"

    if args.lora:
        # A JSON body takes the list; an edit's form its JSON text, as the server reads a
        # form's `lora` (the SDK would flatten a list into `lora[][name]` fields).
        fields["extra_body"]["lora"] = json.dumps(args.lora) if args.image else args.lora

    if args.image:
        fields["image"] = args.image[0] if len(args.image) == 1 else args.image
        if args.mask:
            fields["mask"] = args.mask
        if args.stream:
            stream = client.images.edit(stream=True, partial_images=args.partial_images, **fields)
            return streamed_image(stream, args.partial_images)
        return decoded(client.images.edit(**fields))
    if args.stream:
        stream = client.images.generate(stream=True, partial_images=args.partial_images, **fields)
        return streamed_image(stream, args.partial_images)
    return decoded(client.images.generate(**fields))


def decoded(response: ImagesResponse) -> list[bytes]:
    return [base64.b64decode(item.b64_json or "") for item in response.data or []]


def streamed_image(events: Iterable[Any], partial_images: int) -> list[bytes]:
    """Print a line for each partial image as it arrives; return the completed image."""
    start = time.monotonic()
    for event in events:
        elapsed = time.monotonic() - start
        if event.type.endswith(".partial_image"):
            number = event.partial_image_index + 1
            print(f"partial image {number}/{partial_images} ({event.size}) after {elapsed:.1f}s")
        elif event.type.endswith(".completed"):
            print(f"image completed ({event.size}) after {elapsed:.1f}s")
            return [base64.b64decode(event.b64_json)]
    raise openai.OpenAIError("the stream ended without a completed image")


def output_path(output: Path, index: int) -> Path:
    """`dragon.png` for the first image, then `dragon_1.png`, `dragon_2.png`, ..."""
    return output if index == 0 else output.with_stem(f"{output.stem}_{index}")


def error_message(error: openai.OpenAIError, base_url: str) -> str:
    """The server's own words: `error.message` of its OpenAI-style body
    (`{"error": {"message", "type", "param", "code"}}`), or vLLM's bare
    `{"error": "Unauthorized"}` for a missing or wrong API key."""
    if isinstance(error, openai.APIConnectionError):
        return f"cannot reach {base_url}: {error.message} ({error.__cause__ or 'no answer'})"
    body = getattr(error, "body", None)  # the SDK keeps the body's "error" member
    if isinstance(body, dict) and body.get("message"):
        message = str(body["message"])
    elif isinstance(body, dict) and isinstance(body.get("detail"), str):
        message = body["detail"]  # a route that does not exist, on a plain FastAPI server
    elif isinstance(body, str) and body:
        message = body
    else:
        message = str(error)
    if isinstance(error, openai.APIStatusError):
        message = f"{error.status_code}: {message}"
        if error.status_code == 401:
            message += " (check --api-key or OPENAI_API_KEY)"
        elif error.status_code == 404 and message.endswith(": Not Found"):
            # No such route (the API's own 404s, an unknown model, say more than this).
            message += f" ({no_api_hint(str(error.request.url), base_url)})"
    return message


def no_api_hint(url: str, base_url: str) -> str:
    """What to pass when `base_url` is not the server's OpenAI API (a bare 404 for `url`)."""
    parts = urllib.parse.urlsplit(base_url)
    root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    return (
        f"{url} does not exist: --base-url {base_url} is not the server's OpenAI API; pass "
        f"the server's root, --base-url {root}, or its /v1 URL, {root}/v1"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.base_url = api_url(args.base_url)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        if args.list_models:
            for line in model_lines(client.models.list()):
                print(line)
            return 0
        images = request_images(client, args)
        for index, image in enumerate(images):
            path = output_path(args.output, index)
            path.write_bytes(image)
            print(f"wrote {path}")
    except openai.OpenAIError as error:
        print(f"error: {error_message(error, args.base_url)}", file=sys.stderr)
        return 1
    except OSError as error:  # an --image or --mask that cannot be read, an unwritable --output
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
