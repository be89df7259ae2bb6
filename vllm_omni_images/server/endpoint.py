"""The `vllm.endpoint_plugins` entry point named `images`."""

from __future__ import annotations

from argparse import Namespace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.datastructures import State

from vllm_omni_images.server.cli_args import IMAGE_TASK

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

PLUGIN_NAME = "images"


class ImagesEndpointPlugin:
    """Adds `/v1/images/*` to vLLM's app and builds the serving object behind it."""

    name = PLUGIN_NAME
    required_tasks: Any = (IMAGE_TASK,)

    def attach_router(self, app: FastAPI) -> None:
        from vllm_omni_images.images.api_router import TEXT_ONLY_PATHS, attach_router
        from vllm_omni_images.server.vllm_patches import remove_core_routes

        remove_core_routes(app, TEXT_ONLY_PATHS)
        attach_router(app)

    async def init_state(
        self, engine_client: EngineClient | None, state: State, args: Namespace
    ) -> None:
        from vllm_omni_images.engine.client import ImageEngineClient
        from vllm_omni_images.images.serving import OpenAIServingImage

        if not isinstance(engine_client, ImageEngineClient):
            state.openai_serving_image = None
            return
        state.openai_serving_image = OpenAIServingImage(
            engine_client,
            state.openai_serving_models,
            log_error_stack=getattr(args, "log_error_stack", False),
        )
