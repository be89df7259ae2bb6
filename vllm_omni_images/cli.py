"""The `vllm serve` flags this plugin adds, and how to tell that a command line asks for them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vllm_omni_images.engine import ENGINE_NAMES

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
