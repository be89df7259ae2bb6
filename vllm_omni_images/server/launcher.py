"""`vllm serve <model> --task image`: vLLM's own app and HTTP server around an image engine."""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any, cast

import uvloop
from fastapi import FastAPI
from starlette.datastructures import State
from vllm import envs
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.launcher import serve_http, setup_server
from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
from vllm.logger import init_logger
from vllm.tasks import SupportedTask

from vllm_omni_images.engine.base import ImageEngine, LoRASettings
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.errors import EngineUnavailableError
from vllm_omni_images.engine.metrics import ModelMetrics, image_metrics
from vllm_omni_images.engine.model_source import ModelSource, local_model_path
from vllm_omni_images.engine.selection import EngineSettings, choose_engine, create_engine
from vllm_omni_images.images.app_state import ImagesState
from vllm_omni_images.images.file_store import ImageStore, ImageStoreError
from vllm_omni_images.server import vllm_patches
from vllm_omni_images.server.cli_args import (
    IMAGE_TASK,
    ImageTaskArgs,
    omni_options_from_args,
    served_model_names,
)
from vllm_omni_images.server.endpoint import (
    ImagesEndpointPlugin,
    build_images_state,
    image_store_from_args,
    limits_from_args,
)
from vllm_omni_images.server.http_protocol import HeadLimitedHttpProtocol, head_limited_protocol
from vllm_omni_images.server.model_registry import (
    adapter_name_problem,
    lora_defaults_from_args,
    serving_models_from_args,
)
from vllm_omni_images.server.serve_flags import refusal_message, refused_flags
from vllm_omni_images.tiny_model import resolve_model_path

logger = init_logger(__name__)

IMAGE_TASKS = cast(tuple[SupportedTask, ...], (IMAGE_TASK,))


def build_image_app(args: argparse.Namespace) -> FastAPI:
    """vLLM's `build_app` for the image task, with the Images API attached (and vLLM's
    LoRA load route keeping the fields it does not declare: `defaults`)."""
    vllm_patches.keep_lora_load_extras()
    app = build_app(args, IMAGE_TASKS, None)
    plugin = ImagesEndpointPlugin()
    if vllm_patches.attach_endpoint_plugin(app, plugin):
        logger.info(
            "Attached the '%s' endpoint plugin for --task image; VLLM_PLUGINS need not name it.",
            plugin.name,
        )
    return app


def engine_metrics(args: argparse.Namespace) -> ModelMetrics:
    """Where admission and the engine report (`/metrics`), labelled with the served name."""
    return ModelMetrics(image_metrics(), served_model_names(args)[0])


def make_engine_client(
    engine: ImageEngine, args: argparse.Namespace, metrics: ModelMetrics
) -> ImageEngineClient:
    """Admission in front of `engine`, as the flags say, reporting into `metrics`."""
    return ImageEngineClient(
        engine,
        model_name=args.model,
        config=ImageTaskArgs.from_args(args).admission_config(),
        observer=metrics,
        shutdown_timeout=args.shutdown_timeout,
    )


async def init_image_app_state(
    engine_client: ImageEngineClient,
    state: State,
    args: argparse.Namespace,
    image_store: ImageStore | None = None,
) -> ImagesState:
    """vLLM's app state for the image model and the Images API's (returned), then the
    `--lora-modules` adapters loaded; raises `EngineUnavailableError` for a bad one.
    `image_store`: built and checked already; without one it is built from the flags."""
    models = serving_models_from_args(engine_client, args)
    state.images = images = await build_images_state(
        engine_client, models, args, limits_from_args(args), image_store
    )
    await vllm_patches.init_image_app_state(engine_client, state, args, models)
    try:
        await models.init_static_loras()
    except ValueError as error:  # vLLM's: the engine's refusal, as its message
        raise EngineUnavailableError(f"--lora-modules: {error}") from None
    return images


def lora_settings_from_args(args: argparse.Namespace) -> LoRASettings | None:
    """`--enable-lora` and its limits, checked by vLLM's `LoRAConfig`, and the names
    `--lora-modules` and `--image-lora-defaults` give (before the model loads); `None`
    without it. Raises `EngineUnavailableError`."""
    if not args.enable_lora:
        if args.lora_modules:
            raise EngineUnavailableError(
                "--lora-modules needs --enable-lora (as in vLLM): add it, or drop the adapters."
            )
        lora_defaults_from_args(args)  # refuses --image-lora-defaults without --enable-lora
        return None
    for module in args.lora_modules or []:
        if (problem := adapter_name_problem(module.name, served_model_names(args))) is not None:
            raise EngineUnavailableError(f"--lora-modules: {problem}")
    lora_defaults_from_args(args)
    from pydantic import ValidationError
    from vllm.config.lora import LoRAConfig

    try:
        config = LoRAConfig(
            max_lora_rank=args.max_lora_rank,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
        )
    except (ValueError, ValidationError) as error:
        raise EngineUnavailableError(f"LoRA limits: {error}") from None
    return LoRASettings(
        max_loras=config.max_loras,
        max_cpu_loras=config.max_cpu_loras,
        max_lora_rank=config.max_lora_rank,
    )


def model_source_from_args(args: argparse.Namespace) -> ModelSource:
    return ModelSource(
        revision=args.revision,
        download_dir=args.download_dir,
        token=args.hf_token,
        trust_remote_code=args.trust_remote_code,
    )


def engine_settings_from_args(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        batching=ImageTaskArgs.from_args(args).batching_config(),
        omni_options=omni_options_from_args(args),
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        enforce_eager=args.enforce_eager,
        lora=lora_settings_from_args(args),
    )


def load_engine(args: argparse.Namespace, metrics: ModelMetrics | None = None) -> ImageEngine:
    """Load `args.model` (a diffusers folder, a hub id, or the embedded `tiny-qwen-image`)
    into the engine `--image-engine` chooses."""
    settings = engine_settings_from_args(args)  # the flags' own errors first
    try:
        model_path = local_model_path(resolve_model_path(args.model), model_source_from_args(args))
    except OSError as error:
        raise EngineUnavailableError(
            f"{error} The model must be a diffusers pipeline folder (with a model_index.json), "
            "the hub id of one, or tiny-qwen-image."
        ) from error
    choice = choose_engine(args.image_engine, model_path)
    try:
        return create_engine(model_path, choice, settings=settings, observer=metrics)
    except OSError as error:
        # diffusers' own words for a folder without model_index.json, or a hub id that is not
        # cached while offline: the cause is the model argument, so say that in one line.
        raise EngineUnavailableError(
            f"{error} The model must be a diffusers pipeline folder (with a model_index.json), "
            "the hub id of one, or tiny-qwen-image."
        ) from error


async def load_engine_client(args: argparse.Namespace) -> ImageEngineClient:
    logger.info("Loading image model %s (engine: %s)", args.model, args.image_engine)
    metrics = engine_metrics(args)
    engine = await asyncio.to_thread(load_engine, args, metrics)
    return make_engine_client(engine, args, metrics)


async def serve_image_app(
    app: FastAPI, sock: socket.socket, args: argparse.Namespace, **uvicorn_kwargs: Any
) -> asyncio.Task[Any]:
    """Serve with vLLM's `serve_http` and the same options `vllm serve` passes it, on this
    package's HTTP protocol (`http_protocol.py`: a deadline and vLLM's limits for each request
    head)."""
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config
    return await serve_http(
        app,
        sock=sock,
        http=http_protocol_from_args(args),
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
    # The image store first: a wrong flag or an unreachable bucket stops the start-up before
    # the model loads (minutes, for a large one).
    image_store = image_store_from_args(args)
    await image_store.check()
    listen_address, sock = setup_server(args, reuse_port=False)
    engine_client = await load_engine_client(args)
    images: ImagesState | None = None
    try:
        app = build_image_app(args)
        # Kept here: vLLM's server deletes `app.state` when it shuts down.
        images = await init_image_app_state(engine_client, app.state, args, image_store)
        logger.info("Serving the Images API for %s on %s", args.model, listen_address)
        shutdown_task = await serve_image_app(app, sock, args)
        await shutdown_task
    finally:
        await engine_client.close()
        if images is not None:
            images.close()
        sock.close()


def http_protocol_from_args(args: argparse.Namespace) -> type[HeadLimitedHttpProtocol]:
    """uvicorn's `http` option for `--image-header-timeout`."""
    return head_limited_protocol(ImageTaskArgs.from_args(args).image_header_timeout or None)


def run_image_server_cli(args: argparse.Namespace) -> None:
    parser = vllm_patches.serve_parser()
    if parser is not None and (refused := refused_flags(args, parser)):
        # Before anything loads: a flag the image task cannot honour is never ignored.
        logger.error("Cannot serve %s: %s", args.model, refusal_message(refused))
        raise SystemExit(1)
    vllm_patches.set_server_switch_interval()
    try:
        uvloop.run(run_image_server(args))
    except (EngineUnavailableError, ImageStoreError) as error:
        # A wrong engine, flag or image store for this machine: the message says what to
        # change, and a traceback would only bury it.
        logger.error("Cannot serve %s: %s", args.model, error)
        raise SystemExit(1) from None
