"""The served models through vLLM's serving-models machinery: `/v1/models`, LoRA adapters as
model names, `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`."""

from __future__ import annotations

import logging
import re
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from vllm.config import ModelConfig
from vllm.entrypoints.openai.models.protocol import BaseModelPath, LoRAModulePath
from vllm.entrypoints.openai.models.serving import OpenAIModelRegistry, OpenAIServingModels
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import (
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelPermission,
)
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.lora.request import LoRARequest

from vllm_omni_images.engine.errors import LoRAAdapterError
from vllm_omni_images.images.safe_text import echo
from vllm_omni_images.server.cli_args import served_model_names

logger = logging.getLogger(__name__)

MAX_ADAPTER_NAME_CHARS = 64
ADAPTER_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ADAPTER_NAME_CHARS - 1}}}")
"""What a LoRA adapter may be named: a letter or digit, then letters, digits, `.`, `_` and
`-`, at most `MAX_ADAPTER_NAME_CHARS` in all (no `/`: a served name, not a path)."""

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

    from vllm_omni_images.engine.client import ImageEngineClient


class ImageModelRegistry(OpenAIModelRegistry):
    """vLLM's read-only registry without a text `ModelConfig`: cards without `max_model_len`."""

    def __init__(self, base_model_paths: list[BaseModelPath]) -> None:
        super().__init__(model_config=cast(ModelConfig, None), base_model_paths=base_model_paths)

    async def show_available_models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=path.name, root=path.model_path, permission=[ModelPermission()])
                for path in self.base_model_paths
            ]
        )


class ImageServingModels(OpenAIServingModels):
    """vLLM's `OpenAIServingModels` for an image model (cards from `ImageModelRegistry`), with
    adapter names held to `ADAPTER_NAME` and never a base model's, an adapter the engine
    refuses (`LoRAAdapterError`) a 400, not vLLM's 500, and `/v1/models` leaving out the
    adapters the engine cannot use now (`ImageEngine.unavailable_adapters`)."""

    def __init__(
        self,
        engine_client: ImageEngineClient,
        base_model_paths: list[BaseModelPath],
        *,
        lora_modules: list[LoRAModulePath] | None = None,
    ) -> None:
        super().__init__(
            cast("EngineClient", engine_client), base_model_paths, lora_modules=lora_modules
        )
        self.registry = ImageModelRegistry(base_model_paths)
        self.model_config = cast(ModelConfig, _ServedModel(base_model_paths[0].model_path))
        self._image_engine_client = engine_client

    async def show_available_models(self) -> ModelList:
        models = await super().show_available_models()
        unavailable = self._image_engine_client.engine.unavailable_adapters()
        hidden = {
            lora.lora_name
            for lora in self.lora_requests.values()
            if lora.lora_int_id in unavailable
        }
        models.data = [card for card in models.data if card.parent is None or card.id not in hidden]
        return models

    async def load_lora_adapter(
        self, request: LoadLoRAAdapterRequest, base_model_name: str | None = None
    ) -> ErrorResponse | str:
        """vLLM's, for a name `adapter_name_problem` accepts (else a 400 naming `lora_name`);
        the engine's refusal is a 400 naming `lora_path`, any other failure a 500 whose
        message (which might quote the adapter's files) goes to the log only."""
        problem = adapter_name_problem(request.lora_name, self._base_names())
        if problem is not None:
            return create_error_response(
                problem,
                err_type="BadRequestError",
                status_code=HTTPStatus.BAD_REQUEST,
                param="lora_name",
            )
        result = await super().load_lora_adapter(request, base_model_name)
        if (
            not isinstance(result, ErrorResponse)
            or result.error.code != HTTPStatus.INTERNAL_SERVER_ERROR
        ):
            return result
        if LoRAAdapterError.is_about(result.error.message, request.lora_name):
            return create_error_response(
                result.error.message,
                err_type="BadRequestError",
                status_code=HTTPStatus.BAD_REQUEST,
                param="lora_path",
            )
        logger.error("Loading LoRA adapter %r failed: %s", request.lora_name, result.error.message)
        return create_error_response(
            f"{LoRAAdapterError.prefix(request.lora_name)} could not be loaded (an internal "
            "error; the server's log says why).",
            err_type="InternalServerError",
            status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
        )

    async def unload_lora_adapter(self, request: UnloadLoRAAdapterRequest) -> ErrorResponse | str:
        """vLLM's; a name no adapter may have is vLLM's 404, echoed in part only."""
        if request.lora_name and ADAPTER_NAME.fullmatch(request.lora_name) is None:
            return create_error_response(
                f"The lora adapter {echo(request.lora_name)} cannot be found.",
                err_type="NotFoundError",
                status_code=HTTPStatus.NOT_FOUND,
                param="lora_name",
            )
        return await super().unload_lora_adapter(request)

    async def resolve_lora(self, lora_name: str) -> LoRARequest | ErrorResponse:
        """vLLM's resolver plugins, asked only for a name an adapter may have (else 404)."""
        if adapter_name_problem(lora_name, self._base_names()) is not None:
            return create_error_response(
                f"LoRA adapter {echo(lora_name)} does not exist",
                err_type="NotFoundError",
                status_code=HTTPStatus.NOT_FOUND,
            )
        return await super().resolve_lora(lora_name)

    def _base_names(self) -> list[str]:
        return [path.name for path in self.base_model_paths]


def adapter_name_problem(name: str, base_names: Sequence[str]) -> str | None:
    """Why `name` cannot name a LoRA adapter beside the base model's `base_names`, or `None`."""
    if name in base_names:
        return (
            f"lora_name '{name}' is the base model's served name; an adapter needs a name of "
            "its own."
        )
    if ADAPTER_NAME.fullmatch(name) is None:
        return (
            f"lora_name {echo(name)} is not a valid adapter name: it must start with a letter "
            "or digit and hold only letters, digits, '.', '_' and '-' (no '/'), at most "
            f"{MAX_ADAPTER_NAME_CHARS} characters."
        )
    return None


@dataclass(frozen=True)
class _ServedModel:
    """The one field of a text `ModelConfig` that vLLM's LoRA resolvers read."""

    model: str


def base_model_paths(args: Namespace) -> list[BaseModelPath]:
    return [BaseModelPath(name=name, model_path=args.model) for name in served_model_names(args)]


def serving_models_from_args(
    engine_client: ImageEngineClient, args: Namespace
) -> ImageServingModels:
    """The served models of `--served-model-name` and `--lora-modules` (not loaded yet)."""
    return ImageServingModels(engine_client, base_model_paths(args), lora_modules=args.lora_modules)
