"""An in-process vLLM app for the image task, on the real tiny engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI

from vllm_omni_images.engine.base import ImageEngine
from vllm_omni_images.engine.client import ImageEngineClient

from .helpers import http_client, sdk_client

AppFactory = Callable[..., Awaitable[FastAPI]]


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> ImageEngine:
    from vllm_omni_images.engine.diffusers_engine import DiffusersEngine

    return DiffusersEngine(str(tiny_model_dir), device="cpu")


@pytest.fixture
async def make_app(serve_parser) -> AsyncIterator[AppFactory]:
    """Build the app as `vllm serve tiny-qwen-image --task image <flags>` would."""
    from vllm_omni_images.server.launcher import (
        build_image_app,
        init_image_app_state,
        make_engine_client,
    )

    clients: list[ImageEngineClient] = []
    apps: list[FastAPI] = []

    async def make(engine: ImageEngine | None, flags: Sequence[str] = ()) -> FastAPI:
        args = serve_parser.parse_args(["tiny-qwen-image", "--task", "image", *flags])
        args.model = args.model_tag
        app = build_image_app(args)
        clients.append(make_engine_client(engine, args))
        await init_image_app_state(clients[-1], app.state, args)
        apps.append(app)
        return app

    yield make
    for client in clients:
        if client.scheduler is not None:
            await client.scheduler.close()
    for app in apps:
        if (cleanup := getattr(app.state, "image_store_cleanup", None)) is not None:
            cleanup.cancel()


@pytest.fixture
async def client(
    make_app: AppFactory, tiny_engine: ImageEngine
) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(await make_app(tiny_engine)) as http:
        yield http


@pytest.fixture
async def served(
    make_app: AppFactory, tiny_engine: ImageEngine
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    """The official `openai` SDK, and a plain HTTP client, on one app of the tiny engine."""
    app = await make_app(tiny_engine)
    async with sdk_client(app) as sdk, http_client(app) as http:
        yield sdk, http
