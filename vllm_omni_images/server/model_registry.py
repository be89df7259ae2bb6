"""The served models through vLLM's serving-models machinery: `/v1/models`, LoRA adapters as
model names, `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`."""

from __future__ import annotations

from argparse import Namespace
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
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

from vllm_omni_images.engine.errors import LoRAAdapterError
from vllm_omni_images.server.cli_args import served_model_names

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
    """vLLM's `OpenAIServingModels` for an image model (cards from `ImageModelRegistry`), but
    an adapter the engine refuses (`LoRAAdapterError`) is a 400, not vLLM's 500."""

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

    async def load_lora_adapter(
        self, request: LoadLoRAAdapterRequest, base_model_name: str | None = None
    ) -> ErrorResponse | str:
        result = await super().load_lora_adapter(request, base_model_name)
        if (
            isinstance(result, ErrorResponse)
            and result.error.code == HTTPStatus.INTERNAL_SERVER_ERROR
            and LoRAAdapterError.is_about(result.error.message, request.lora_name)
        ):
            return create_error_response(
                result.error.message,
                err_type="BadRequestError",
                status_code=HTTPStatus.BAD_REQUEST,
                param="lora_path",
            )
        return result


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
