"""The `vllm.endpoint_plugins` entry point named `images`."""

from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.datastructures import State

from vllm_omni_images.server.cli_args import IMAGE_TASK

if TYPE_CHECKING:
    from PIL import Image
    from vllm.engine.protocol import EngineClient

    from vllm_omni_images.images.edits import RemoteImageFetcher
    from vllm_omni_images.images.file_store import ImageStore

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
        store = image_store_from_args(args)
        # Kept on the state: the loop holds tasks only weakly.
        state.image_store_cleanup = asyncio.get_running_loop().create_task(
            store.run_cleanup(), name="image-store-cleanup"
        )
        state.openai_serving_image = OpenAIServingImage(
            engine_client,
            state.openai_serving_models,
            log_error_stack=getattr(args, "log_error_stack", False),
            image_store=store,
            fetch_remote_image=remote_image_fetcher(args),
        )


def remote_image_fetcher(args: Namespace) -> RemoteImageFetcher | None:
    """vLLM's own media fetching for image URLs, limited to `--allowed-media-domains`; `None`
    (no URL is fetched) when the operator named no host."""
    domains = getattr(args, "allowed_media_domains", None)
    if not domains:
        return None
    from vllm.multimodal.media.connector import MediaConnector

    connector = MediaConnector(allowed_media_domains=list(domains))

    async def fetch(url: str) -> Image.Image:
        return await connector.fetch_image_async(url, image_mode=None)  # keeps a mask's alpha

    return fetch


def image_store_from_args(args: Namespace) -> ImageStore:
    from vllm_omni_images.images.file_store import LocalImageStore

    directory = args.image_store_dir
    if directory is None:  # a folder of this server's own, gone when it exits
        directory = tempfile.mkdtemp(prefix="vllm-omni-images-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return LocalImageStore(
        Path(directory),
        ttl_s=args.image_url_ttl,
        max_bytes=int(args.image_store_max_mb * 1024 * 1024),
    )
