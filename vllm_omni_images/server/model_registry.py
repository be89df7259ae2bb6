"""What `/v1/models` lists for an image server, through vLLM's own model registry."""

from __future__ import annotations

from argparse import Namespace
from typing import cast

from vllm.config import ModelConfig
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIModelRegistry
from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, ModelPermission


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


def registry_from_args(args: Namespace) -> ImageModelRegistry:
    names = args.served_model_name or [args.model]
    return ImageModelRegistry([BaseModelPath(name=name, model_path=args.model) for name in names])
