"""An in-process vLLM app for the image task, on the real tiny engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
from fastapi import FastAPI

from tests.support.engines import DelegatingRunner
from vllm_omni_images.engine.base import ImageEngine
from vllm_omni_images.engine.batching import PipelineRunner
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.images.app_state import ImagesState

from .helpers import http_client, sdk_client

if TYPE_CHECKING:
    from tests.support.omni import WorkerProbe
    from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
    from vllm_omni_images.engine.omni_engine import OmniEngine
    from vllm_omni_images.images.app_state import ImagesState

AppFactory = Callable[..., Awaitable[FastAPI]]


@pytest.fixture(scope="session")
def tiny_runner(tiny_model_dir: Path) -> DiffusersRunner:
    """The diffusers runner of the tiny model, shared by the session (never closed)."""
    from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

    return DiffusersRunner(str(tiny_model_dir), device="cpu")


@pytest.fixture
async def make_app(serve_parser) -> AsyncIterator[AppFactory]:
    """Build the app as `vllm serve tiny-qwen-image --task image <flags>` would."""
    from vllm_omni_images.engine.batching import BatchingEngine
    from vllm_omni_images.server.cli_args import ImageTaskArgs
    from vllm_omni_images.server.launcher import (
        build_image_app,
        engine_metrics,
        init_image_app_state,
        make_engine_client,
    )

    owned: list[ImageEngineClient] = []
    states: list[ImagesState] = []

    async def make(engine: ImageEngine | PipelineRunner, flags: Sequence[str] = ()) -> FastAPI:
        """An app on `engine` (an engine the test owns, e.g. the shared omni engine), or on
        the diffusers engine `vllm serve` builds around a runner (the tiny runner, or a
        wrapper of it), closed with the app."""
        args = serve_parser.parse_args(["tiny-qwen-image", "--task", "image", *flags])
        args.model = args.model_tag
        app = build_image_app(args)
        metrics = engine_metrics(args)
        if isinstance(engine, ImageEngine):
            client = make_engine_client(engine, args, metrics)
        else:
            if not isinstance(engine, DelegatingRunner):
                engine = DelegatingRunner(engine)  # the shared runner stays open
            batching = BatchingEngine(
                engine, ImageTaskArgs.from_args(args).batching_config(), observer=metrics
            )
            client = make_engine_client(batching, args, metrics)
            owned.append(client)
        states.append(await init_image_app_state(client, app.state, args))
        return app

    yield make
    for client in owned:
        await client.close()
    for state in states:
        state.close()


@pytest.fixture
async def client(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(await make_app(tiny_runner)) as http:
        yield http


@pytest.fixture
async def served(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    """The official `openai` SDK, and a plain HTTP client, on one app of the tiny engine."""
    app = await make_app(tiny_runner)
    async with sdk_client(app) as sdk, http_client(app) as http:
        yield sdk, http


@pytest.fixture(scope="module")
def probe(omni_engine: OmniEngine) -> WorkerProbe:
    """`WorkerProbe` on the module's own `omni_engine` (each omni module defines one)."""
    from tests.support.omni import WorkerProbe

    return WorkerProbe(omni_engine)


@pytest.fixture
def worker(probe: WorkerProbe) -> Iterator[WorkerProbe]:
    """The module's probe, reset before and after the test."""
    probe.reset()
    yield probe
    probe.reset()
