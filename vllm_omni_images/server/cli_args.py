"""The `vllm serve` flags this plugin adds, and how to tell that a command line asks for them.

Imported by the general plugin in every vLLM process, so it imports nothing heavy: the
launcher turns the parsed flags into engine and scheduler settings.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vllm_omni_images.engine.selection import ENGINE_NAMES

IMAGE_TASK = "image"
HELP_GROUP = "ImageTask"  # `vllm serve --help=ImageTask` lists the image options


def add_image_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add `--task` and the image options to a `vllm serve` parser (idempotent)."""
    if any("--task" in action.option_strings for action in parser._actions):
        return
    group = parser.add_argument_group(
        HELP_GROUP,
        "Serve a diffusion model through the OpenAI Images API with `--task image` "
        "(from the vllm-omni-images plugin).",
    )
    group.add_argument(
        "--task",
        choices=[IMAGE_TASK],
        default=None,
        help="Serve the model for this task instead of text generation. `image` serves "
        "the OpenAI Images API (POST /v1/images/generations) for a diffusion model; the "
        "model may be a diffusers pipeline folder, a hub id, or `tiny-qwen-image` (a tiny "
        "embedded model that needs no download).",
    )
    group.add_argument(
        "--image-engine",
        choices=ENGINE_NAMES,
        default="auto",
        help="Which engine runs the diffusion model. `auto` picks vllm-omni's engine on a "
        "GPU for the models it supports and diffusers otherwise; `diffusers` serves any "
        "diffusers pipeline on CPU or GPU.",
    )
    group.add_argument(
        "--image-max-batch-size",
        type=_positive_int,
        default=4,
        help="Most images generated in one pipeline call. Compatible requests (same size, "
        "steps and guidance) share a call; a request's `n` images count each. 1 turns "
        "batching off. A single request with more images still runs, alone.",
    )
    group.add_argument(
        "--image-batch-delay-ms",
        type=_non_negative_float,
        default=0.0,
        help="How long an idle engine holds a batch that is not full, waiting for compatible "
        "company (counted from the arrival of its oldest request). Batches form anyway from "
        "requests that queue while the engine is busy, so 0 adds no latency to a lone "
        "request; a few ms can group bursts that arrive at an idle engine.",
    )
    group.add_argument(
        "--image-max-queue",
        type=_positive_int,
        default=256,
        help="Most images waiting for the engine. Beyond it requests get 429 with a "
        "Retry-After header.",
    )
    group.add_argument(
        "--image-request-timeout",
        type=_non_negative_float,
        default=600.0,
        help="Seconds a request may wait and run before it fails with a timeout error "
        "(504); its work stops at the next denoising step. 0 means no limit.",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _is_serve_command(argv: Sequence[str]) -> bool:
    return len(argv) > 1 and argv[1] == "serve"


def asks_for_image_task(argv: Sequence[str]) -> bool:
    """Whether a command line (before parsing) is `vllm serve ... --task image`."""
    if not _is_serve_command(argv):
        return False
    for index, arg in enumerate(argv):
        if arg == f"--task={IMAGE_TASK}":
            return True
        if arg == "--task" and index + 1 < len(argv) and argv[index + 1] == IMAGE_TASK:
            return True
    return False


def asks_for_serve_help(argv: Sequence[str]) -> bool:
    """Whether the command line is `vllm serve ... --help` (help starts no engine)."""
    return _is_serve_command(argv) and any(
        arg == "-h" or arg == "--help" or arg.startswith("--help=") for arg in argv[2:]
    )
