"""The served models, through vLLM's own serving-models machinery: `/v1/models`, the LoRA
adapters served as model names, and vLLM's `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`."""

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
    """vLLM's read-only registry without a text `ModelConfig`: a diffusion model has no
    context length, so its cards leave `max_model_len` out."""

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
    """vLLM's `OpenAIServingModels` for an image model: the base model's cards from
    `ImageModelRegistry`, each adapter's card with the base model as `parent`, and adapters
    added through the engine client's `add_lora`. vLLM's own code does the rest: the static
    `--lora-modules` (`init_static_loras`), the load and unload routes, LoRA resolver plugins.

    Two things differ from a text model's. An adapter the engine refuses (missing,
    unreadable, made for another model, rank too high: `LoRAAdapterError`, whose message names
    the adapter) is a 400, where vLLM answers any failure but a missing adapter with a 500;
    vLLM tells its own "not found" by the error's message, and so does this. And vLLM's LoRA
    resolvers read the served model's path from the text `ModelConfig`: they get a stand-in
    that holds only that.
    """

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
    """The served models as `--served-model-name` and `--lora-modules` say (the adapters are
    loaded by `init_static_loras`)."""
    return ImageServingModels(engine_client, base_model_paths(args), lora_modules=args.lora_modules)
