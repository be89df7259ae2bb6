"""Every change this plugin makes to vLLM's own objects, in one place.

vLLM 0.30 has no `--task` flag and no hook to add a subcommand mode, so the general plugin
wraps two of its functions. `tests/unit/test_vllm_patches.py` fails loudly when vLLM moves
any of them; nothing else in the package touches vLLM internals.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from vllm.logger import init_logger

from vllm_omni_images.cli import IMAGE_TASK, add_image_cli_args

logger = init_logger(__name__)

SERVE_CLI_MODULE = "vllm.entrypoints.cli.serve"
_PATCHED_MARK = "_vllm_omni_images_patched"


def _is_serve_parser(parser: argparse.ArgumentParser) -> bool:
    words = parser.prog.split()
    return bool(words) and words[-1] == "serve" and "bench" not in words


def patch_engine_args_cli() -> None:
    """Add our flags to every `vllm serve` parser that vLLM builds.

    `AsyncEngineArgs.add_cli_args` loads general plugins and then calls
    `EngineArgs.add_cli_args`, looked up on the class at call time, so wrapping it here takes
    effect for the parser being built.
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args
    if getattr(original, _PATCHED_MARK, False):
        return

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = original(parser, *args, **kwargs)
        if _is_serve_parser(parser):
            add_image_cli_args(parser)
        return parser

    setattr(add_cli_args, _PATCHED_MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]


def patch_serve_command(run_image_server: Callable[[argparse.Namespace], None]) -> None:
    """Route `vllm serve --task image` to our launcher; every other serve runs as before.

    `vllm`'s CLI reads `ServeSubcommand.cmd` after building the serve parser (which loads the
    general plugins), so replacing it on the class here is what the CLI dispatches to. The
    module is only patched where the CLI already imported it: engine and worker processes
    load general plugins too and must not pay for importing the CLI.
    """
    serve_module = sys.modules.get(SERVE_CLI_MODULE)
    if serve_module is None:
        return
    serve_subcommand = serve_module.ServeSubcommand
    original = serve_subcommand.cmd
    if getattr(original, _PATCHED_MARK, False):
        return

    def cmd(args: argparse.Namespace) -> None:
        if getattr(args, "task", None) != IMAGE_TASK:
            original(args)
            return
        if getattr(args, "model_tag", None) is not None:
            args.model = args.model_tag
        run_image_server(args)

    setattr(cmd, _PATCHED_MARK, True)
    serve_subcommand.cmd = staticmethod(cmd)


def fall_back_to_cpu_platform() -> bool:
    """Use vLLM's CPU platform when no accelerator is found; True if it switched.

    vLLM cannot even build its `serve` parser on an unspecified platform. It does the same
    switch itself for `vllm bench`; we do it only for the image task and for `serve --help`.
    """
    from vllm import platforms

    if not platforms.current_platform.is_unspecified():
        return False
    from vllm.platforms.cpu import CpuPlatform

    platforms.current_platform = CpuPlatform()
    logger.info("No accelerator found: using vLLM's CPU platform for the image task.")
    return True
