"""The `vllm.endpoint_plugins` entry point named `images`."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import shutil
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.datastructures import State

from vllm_omni_images.server.cli_args import IMAGE_TASK, ImageTaskArgs, served_model_names

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    from vllm_omni_images.engine.client import ImageEngineClient
    from vllm_omni_images.images.app_state import ImagesState
    from vllm_omni_images.images.edits import RemoteImageFetcher
    from vllm_omni_images.images.file_store import ImageStore
    from vllm_omni_images.images.limits import ImageLimits

PLUGIN_NAME = "images"

logger = logging.getLogger(__name__)


class ImagesEndpointPlugin:
    """Adds `/v1/images/*` to vLLM's app and builds the serving object behind it."""

    name = PLUGIN_NAME
    required_tasks: Any = (IMAGE_TASK,)

    def attach_router(self, app: FastAPI) -> None:
        from starlette.exceptions import HTTPException

        from vllm_omni_images.images.api_router import (
            TEXT_ONLY_PATHS,
            attach_router,
            starlette_http_error,
        )
        from vllm_omni_images.server.vllm_patches import add_exception_handler, remove_core_routes

        remove_core_routes(app, TEXT_ONLY_PATHS)
        attach_router(app)
        add_exception_handler(app, HTTPException, starlette_http_error)

    async def init_state(
        self, engine_client: EngineClient | None, state: State, args: Namespace
    ) -> None:
        from vllm_omni_images.images.app_state import images_state

        if images_state(state) is None:  # the launcher sets it first, with its checked store
            state.images = await build_images_state(
                engine_client, state.openai_serving_models, args, limits_from_args(args)
            )


async def build_images_state(
    engine_client: EngineClient | ImageEngineClient | None,
    models: OpenAIServingModels,
    args: Namespace,
    limits: ImageLimits,
    store: ImageStore | None = None,
) -> ImagesState:
    """The app's `ImagesState`: for an image engine, its serving object on `store` (else one
    built from the flags and checked) and the store's expiry loop; else the limits only."""
    from vllm_omni_images.engine.client import ImageEngineClient
    from vllm_omni_images.images.app_state import ImagesState
    from vllm_omni_images.images.request_metrics import RequestMetrics
    from vllm_omni_images.images.serving import OpenAIServingImage
    from vllm_omni_images.server.model_registry import ImageServingModels

    if not isinstance(engine_client, ImageEngineClient):
        return ImagesState(limits)
    if store is None:
        store = image_store_from_args(args)
        await store.check()
    cleanup = asyncio.get_running_loop().create_task(
        store.run_cleanup(), name="image-store-cleanup"
    )
    serving = OpenAIServingImage(
        engine_client,
        models,
        log_error_stack=getattr(args, "log_error_stack", False),
        image_store=store,
        image_url_base=args.image_url_base,
        default_response_format=args.image_default_response_format,
        fetch_remote_image=remote_image_fetcher(args, limits),
        limits=limits,
        request_metrics=RequestMetrics(served_model_names(args)[0]),
        seed=args.seed,
        # Read per request: loads and unloads change the adapters' defaults in place.
        adapter_defaults=models.adapter_defaults if isinstance(models, ImageServingModels) else {},
    )
    return ImagesState(limits, serving, cleanup)


def limits_from_args(args: Namespace) -> ImageLimits:
    """The `--image-max-*` flags as `ImageLimits`; logs a warning for an
    `--image-max-input-images` above what the engines edit."""
    from vllm_omni_images.images.limits import EDIT_INPUT_IMAGES

    if args.image_max_input_images > EDIT_INPUT_IMAGES:
        logger.warning(
            "--image-max-input-images %d is more than the engines edit at once (%d): an edit "
            "or variation that sends more than one image is refused (400).",
            args.image_max_input_images,
            EDIT_INPUT_IMAGES,
        )
    limits = ImageTaskArgs.from_args(args).image_limits()
    # vLLM's --max-loras: a request's stack of adapters is loaded into the model at once.
    return dataclasses.replace(limits, max_loras=getattr(args, "max_loras", None) or 1)


def remote_image_fetcher(args: Namespace, limits: ImageLimits) -> RemoteImageFetcher | None:
    """vLLM's media fetching for image URLs of `--allowed-media-domains` (`None`: no host),
    held to `limits`' input bytes (413) and to vLLM's `VLLM_IMAGE_FETCH_TIMEOUT` in all (a
    `ValueError` that says so); the bytes are decoded as an upload's are (the format, pixel
    limit and orientation of `images/input_images.py`)."""
    domains = getattr(args, "allowed_media_domains", None)
    if not domains:
        return None
    from vllm import envs
    from vllm.connections import HTTPResponseSizeExceededError, MediaDownloadSizeExceededError
    from vllm.multimodal.media.base import MediaIO
    from vllm.multimodal.media.connector import MediaConnector

    from vllm_omni_images.images.errors import PayloadTooLargeError

    class ImageBytesIO(MediaIO[bytes]):
        """vLLM's media fetching with this server's byte limit, giving the bytes undecoded
        (only http(s) URLs are passed: `data:` URLs are read by the route, files never)."""

        def get_max_bytes(self) -> int:
            return limits.max_input_bytes

        def load_bytes(self, data: bytes) -> bytes:
            return data

        def load_base64(self, media_type: str, data: str) -> bytes:
            raise ValueError("only http(s) image URLs are fetched")

        def load_file(self, filepath: Path) -> bytes:
            raise ValueError("only http(s) image URLs are fetched")

    connector = MediaConnector(allowed_media_domains=list(domains))
    image_io = ImageBytesIO()
    # One deadline for a fetch, vLLM's retries included: vLLM gives each retry four times the
    # timeout of the last, so a host that trickles took 113 s to refuse at the default 5 s.
    timeout_s = envs.VLLM_IMAGE_FETCH_TIMEOUT

    async def fetch(url: str) -> bytes:
        try:
            async with asyncio.timeout(timeout_s):
                return await connector.load_from_url_async(url, image_io, fetch_timeout=timeout_s)
        except TimeoutError:
            raise ValueError(
                f"the image did not arrive within {timeout_s} s, the most this server waits "
                "for one, retries included (VLLM_IMAGE_FETCH_TIMEOUT)"
            ) from None
        except (HTTPResponseSizeExceededError, MediaDownloadSizeExceededError):
            raise PayloadTooLargeError(
                f"The image at the URL is larger than {limits.max_input_bytes} bytes "
                "(--image-max-input-mb)."
            ) from None
        except (ValueError, OSError):
            raise
        except Exception as error:  # vLLM's fetch errors: an HTTP status, a timeout
            raise ValueError(str(error) or type(error).__name__) from None

    return fetch


def image_store_from_args(args: Namespace) -> ImageStore:
    """The store of `--image-store-dir` / `--image-store-url`; raises `ImageStoreError` for
    flags that do not go together (nothing is reached yet: `ImageStore.check` does that)."""
    from vllm_omni_images.images.file_store import ImageStoreError, LocalImageStore

    url = args.image_store_url
    presigned = args.image_urls == "presigned"
    if url is not None:
        from vllm_omni_images.images.s3_store import S3ImageStore, S3Location

        given = [
            flag
            for flag, value in (
                ("--image-store-dir", args.image_store_dir),
                ("--image-store-max-mb", args.image_store_max_mb),
            )
            if value is not None
        ]
        if given:
            raise ImageStoreError(
                f"{', '.join(given)} apply to a local folder, not to --image-store-url {url}"
            )
        if presigned and args.image_url_base is not None:
            raise ImageStoreError(
                "--image-url-base applies to the server's own image URLs, not to "
                "--image-urls presigned (the store's URLs carry the store's address)"
            )
        try:
            location = S3Location.parse(url)
        except ValueError as error:
            raise ImageStoreError(f"--image-store-url: {error}") from None
        return S3ImageStore(location, ttl_s=args.image_url_ttl, presigned_urls=presigned)
    if presigned:
        raise ImageStoreError(
            "--image-urls presigned needs an object store (--image-store-url s3://...); a "
            "local folder is answered by the server (--image-urls server)"
        )
    directory = args.image_store_dir
    if directory is None:  # a folder of this server's own, gone when it exits
        directory = tempfile.mkdtemp(prefix="vllm-omni-images-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return LocalImageStore(
        Path(directory),
        ttl_s=args.image_url_ttl,
        max_bytes=ImageTaskArgs.from_args(args).store_max_bytes,
    )
