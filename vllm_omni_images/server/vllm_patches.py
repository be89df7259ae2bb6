"""Every change this package makes to vLLM's own objects and to the process vLLM runs in, but
one: `engine/omni_engine.py` makes spawn the multiprocessing start method for vllm-omni's
workers. Who calls each is in docs/architecture.md, "Where vLLM is changed"."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, cast

from vllm.logger import init_logger

from vllm_omni_images.server.cli_args import IMAGE_TASK, add_image_cli_args

if TYPE_CHECKING:
    from fastapi import FastAPI, Request, Response
    from starlette.datastructures import State
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    from vllm_omni_images.engine.client import ImageEngineClient

logger = init_logger(__name__)

SERVE_CLI_MODULE = "vllm.entrypoints.cli.serve"
OMNI_SERVE_FLAG = "--omni"
_PATCHED_MARK = "_vllm_omni_images_patched"

# The last `vllm serve` parser vLLM built in this process (the one that parsed its command
# line): vLLM keeps no reference to it that the launcher could reach.
_serve_parser: argparse.ArgumentParser | None = None


def _is_serve_parser(parser: argparse.ArgumentParser) -> bool:
    words = parser.prog.split()
    return bool(words) and words[-1] == "serve" and "bench" not in words


def patch_engine_args_cli() -> None:
    """Add our flags to every `vllm serve` parser that vLLM builds (but `--omni`'s); idempotent."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args
    if getattr(original, _PATCHED_MARK, False):
        return

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        global _serve_parser
        parser = original(parser, *args, **kwargs)
        # `vllm serve --omni` is vllm-omni's own server: it adds the vllm-omni flags that the
        # image task shares (--cache-backend, ...) to this parser itself.
        if _is_serve_parser(parser) and OMNI_SERVE_FLAG not in sys.argv:
            add_image_cli_args(parser)
            _serve_parser = parser
        return parser

    setattr(add_cli_args, _PATCHED_MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]


def serve_parser() -> argparse.ArgumentParser | None:
    """The serve parser with the image flags that vLLM built last here; None before one."""
    return _serve_parser


def patch_serve_command(run_image_server: Callable[[argparse.Namespace], None]) -> None:
    """Route `vllm serve --task image` to `run_image_server`, every other serve as before; only
    where vLLM's CLI module is already imported (worker processes must not import it)."""
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
    """Use vLLM's CPU platform when no accelerator is found; True if it switched."""
    from vllm import platforms

    unspecified = platforms.current_platform
    if not unspecified.is_unspecified():
        return False
    from vllm.platforms.cpu import CpuPlatform

    cpu = CpuPlatform()
    platforms.current_platform = cpu
    # Modules that bound the unspecified platform at import (`vllm.utils.mem_utils`, read by
    # vllm-omni's worker when it runs in this process) see the CPU one too.
    for module in list(sys.modules.values()):
        if getattr(module, "current_platform", None) is unspecified:
            module.current_platform = cpu  # type: ignore[attr-defined]
    # `vllm.utils.torch_utils.PIN_MEMORY` (and the modules that imported it by name, e.g.
    # vLLM's LoRA loader, which vllm-omni's adapters go through) was read from the
    # unspecified platform, which says yes; pinning needs a CUDA driver.
    from vllm.utils import platform_utils

    platform_utils.is_pin_memory_available.cache_clear()
    for module in list(sys.modules.values()):
        in_vllm = module is not None and module.__name__.startswith("vllm.")
        if in_vllm and getattr(module, "PIN_MEMORY", None) is True:
            module.PIN_MEMORY = cpu.is_pin_memory_available()  # type: ignore[attr-defined]
    # Processes started from here (vllm-omni's `mp` workers) pick it themselves.
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    logger.info("No accelerator found: using vLLM's CPU platform for the image task.")
    return True


def keep_lora_load_extras() -> None:
    """Make vLLM's `LoadLoRAAdapterRequest` keep the fields it does not declare (in
    `model_extra`) instead of dropping them, so that `ImageServingModels.load_lora_adapter`
    reads `defaults` and refuses any other by name. Idempotent; in force for the routes
    built after it (FastAPI builds a route's body validator when the route is added: before
    vLLM's `build_app`)."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    if LoadLoRAAdapterRequest.model_config.get("extra") == "allow":
        return
    LoadLoRAAdapterRequest.model_config["extra"] = "allow"
    LoadLoRAAdapterRequest.model_rebuild(force=True)


def remove_core_routes(app: FastAPI, paths: Collection[str]) -> None:
    """Drop vLLM's own handlers for `paths` from its app, so the routes we attach answer."""
    app.router.routes[:] = [
        route for route in app.router.routes if getattr(route, "path", None) not in paths
    ]


def add_exception_handler(
    app: FastAPI,
    error_class: type[Exception],
    handler: Callable[[Request, Exception], Awaitable[Response]],
) -> None:
    """`app.add_exception_handler`, in force at once: vLLM's `build_app` has built the app's
    middleware stack already (its SageMaker bootstrap does), and the stack keeps the handlers
    it was built with, so it is built again, as that bootstrap builds it."""
    app.add_exception_handler(error_class, handler)
    if app.middleware_stack is not None:
        app.middleware_stack = app.build_middleware_stack()


def attach_endpoint_plugin(app: FastAPI, plugin: Any) -> bool:
    """Attach `plugin` as vLLM attaches endpoint plugins, unless it did; True if added here."""
    plugins: list[Any] = list(getattr(app.state, "endpoint_plugins", []))
    if any(getattr(attached, "name", None) == plugin.name for attached in plugins):
        return False
    plugin.attach_router(app)
    app.state.endpoint_plugins = [*plugins, plugin]
    return True


async def init_image_app_state(
    engine_client: ImageEngineClient,
    state: State,
    args: argparse.Namespace,
    models: OpenAIServingModels,
) -> None:
    """vLLM's `init_app_state` as it applies to an image model, then its endpoint plugins'."""
    from vllm.engine.protocol import EngineClient
    from vllm.plugins.endpoint_plugins.interface import init_endpoint_plugins_state

    state.engine_client = engine_client
    state.log_stats = not args.disable_log_stats
    state.args = args
    state.openai_serving_models = models
    state.enable_server_load_tracking = args.enable_server_load_tracking
    state.server_load_metrics = 0
    # vLLM's core routes and server loop use only the parts of `EngineClient` that
    # `ImageEngineClient` provides (see its docstring).
    await init_endpoint_plugins_state(cast(EngineClient, engine_client), state, args)


# The engine thread runs Python between torch ops while holding the GIL; the default 5 ms
# switch interval would let it keep the event loop waiting that long for every handover.
SERVER_SWITCH_INTERVAL_S = 0.001


def set_server_switch_interval() -> None:
    """Process-wide: hand the GIL over every 1 ms (docs/performance.md)."""
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL_S)
