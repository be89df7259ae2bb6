"""The `vllm.general_plugins` entry point: adds `--task image` to `vllm serve`.

vLLM calls `register` in every process, maybe more than once: it is cheap and idempotent, and
its patches act only on `vllm serve`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vllm_omni_images.server.cli_args import asks_for_image_task, asks_for_serve_help


def _run_image_server(args: argparse.Namespace) -> None:
    from vllm_omni_images.server.launcher import run_image_server_cli

    run_image_server_cli(args)


def log_through_vllm() -> None:
    """Print this package's logs through vLLM's `vllm` handler, at its level."""
    ours = logging.getLogger("vllm_omni_images")
    vllm_root = logging.getLogger("vllm")
    for handler in vllm_root.handlers:
        # vLLM's logging config names its handler "vllm"; others (a test harness's) stay put.
        if handler.name == "vllm" and handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(vllm_root.level)


def register() -> None:
    from vllm_omni_images.server import vllm_patches

    if asks_for_image_task(sys.argv):
        log_through_vllm()
    if asks_for_image_task(sys.argv) or asks_for_serve_help(sys.argv):
        vllm_patches.fall_back_to_cpu_platform()
    vllm_patches.patch_engine_args_cli()
    vllm_patches.patch_serve_command(_run_image_server)
