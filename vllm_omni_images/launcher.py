"""`vllm serve <model> --task image`: vLLM's own app and HTTP server around an image engine."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any, cast

import uvloop
from fastapi import FastAPI
from starlette.datastructures import State
from vllm import envs
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.launcher import serve_http, setup_server
from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
from vllm.logger import init_logger
from vllm.plugins.endpoint_plugins.interface import init_endpoint_plugins_state
from vllm.tasks import SupportedTask

from vllm_omni_images.cli import IMAGE_TASK, scheduler_config_from_args
from vllm_omni_images.endpoint import PLUGIN_NAME, ImagesEndpointPlugin
from vllm_omni_images.engine import ImageEngine, create_engine
from vllm_omni_images.engine_client import ImageEngineClient
from vllm_omni_images.metrics import ModelMetrics, image_metrics
from vllm_omni_images.models import registry_from_args

logger = init_logger(__name__)

IMAGE_TASKS = cast(tuple[SupportedTask, ...], (IMAGE_TASK,))


def build_image_app(args: argparse.Namespace) -> FastAPI:
    """vLLM's `build_app` for the image task, with our endpoint plugin attached.

    The user asked for `--task image`, so the Images API is attached even when
    `VLLM_PLUGINS` does not allowlist it.
    """
    app = build_app(args, IMAGE_TASKS, None)
    plugins: list[Any] = list(getattr(app.state, "endpoint_plugins", []))
    if not any(getattr(plugin, "name", None) == PLUGIN_NAME for plugin in plugins):
        plugin = ImagesEndpointPlugin()
        plugin.attach_router(app)
        plugins.append(plugin)
        logger.info(
            "Attached the '%s' endpoint plugin for --task image; VLLM_PLUGINS need not name it.",
            PLUGIN_NAME,
        )
    app.state.endpoint_plugins = plugins
    return app


async def init_image_app_state(
    engine_client: ImageEngineClient, state: State, args: argparse.Namespace
) -> None:
    """The part of vLLM's `init_app_state` that applies to an image model."""
    state.engine_client = engine_client
    state.log_stats = not args.disable_log_stats
    state.args = args
    state.openai_serving_models = registry_from_args(args)
    state.enable_server_load_tracking = args.enable_server_load_tracking
    state.server_load_metrics = 0
    # vLLM's core routes and server loop use only the parts of `EngineClient` that
    # `ImageEngineClient` provides (see its docstring).
    await init_endpoint_plugins_state(cast(EngineClient, engine_client), state, args)


def make_engine_client(engine: ImageEngine | None, args: argparse.Namespace) -> ImageEngineClient:
    """The engine client for `engine`, scheduled and measured as the flags say."""
    served_name = (args.served_model_name or [args.model])[0]
    return ImageEngineClient(
        engine,
        model_name=args.model,
        scheduler_config=scheduler_config_from_args(args),
        metrics=ModelMetrics(image_metrics(), served_name),
        shutdown_timeout=args.shutdown_timeout,
    )


async def load_engine_client(args: argparse.Namespace) -> ImageEngineClient:
    logger.info("Loading image model %s (engine: %s)", args.model, args.image_engine)
    engine = await asyncio.to_thread(create_engine, args.model, args.image_engine)
    return make_engine_client(engine, args)


async def serve_image_app(
    app: FastAPI, sock: socket.socket, args: argparse.Namespace, **uvicorn_kwargs: Any
) -> asyncio.Task[Any]:
    """Serve with vLLM's `serve_http` and the same options `vllm serve` passes it."""
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config
    return await serve_http(
        app,
        sock=sock,
        enable_ssl_refresh=args.enable_ssl_refresh,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
        **uvicorn_kwargs,
    )


async def run_image_server(args: argparse.Namespace) -> None:
    listen_address, sock = setup_server(args, reuse_port=False)
    engine_client = await load_engine_client(args)
    try:
        app = build_image_app(args)
        await init_image_app_state(engine_client, app.state, args)
        logger.info("Serving the Images API for %s on %s", args.model, listen_address)
        shutdown_task = await serve_image_app(app, sock, args)
        await shutdown_task
    finally:
        await engine_client.close()
        sock.close()


# The engine thread runs Python between torch ops while holding the GIL; the default 5 ms
# switch interval would let it keep the event loop waiting that long for every handover.
SERVER_SWITCH_INTERVAL_S = 0.001


def run_image_server_cli(args: argparse.Namespace) -> None:
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL_S)
    uvloop.run(run_image_server(args))
