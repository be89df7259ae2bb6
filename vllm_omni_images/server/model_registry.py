"""The served models through vLLM's serving-models machinery: `/v1/models`, LoRA adapters as
model names and their defaults, `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`."""

from __future__ import annotations

import logging
import re
from argparse import Namespace
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from pydantic import ValidationError
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

from vllm_omni_images.engine.base import AdapterDefaults
from vllm_omni_images.engine.errors import EngineUnavailableError, LoRAAdapterError
from vllm_omni_images.images.adapter_defaults import defaults_problem, parse_adapter_defaults
from vllm_omni_images.images.safe_text import echo, printable
from vllm_omni_images.server.cli_args import served_model_names

logger = logging.getLogger(__name__)

MAX_ADAPTER_NAME_CHARS = 64
ADAPTER_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ADAPTER_NAME_CHARS - 1}}}")
"""What a LoRA adapter may be named: a letter or digit, then letters, digits, `.`, `_` and
`-`, at most `MAX_ADAPTER_NAME_CHARS` in all (no `/`: a served name, not a path)."""

DEFAULTS_FIELD = "defaults"
"""The field of a `/v1/load_lora_adapter` body that gives the adapter's defaults (vLLM's
`LoadLoRAAdapterRequest` keeps it, and any other extra field, in `model_extra`:
`vllm_patches.keep_lora_load_extras`)."""

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
    refuses (`LoRAAdapterError`) a 400, not vLLM's 500, `/v1/models` leaving out the
    adapters the engine cannot use now (`ImageEngine.unavailable_adapters`), and each
    adapter's defaults (`adapter_defaults`) kept beside it and shown on its card."""

    def __init__(
        self,
        engine_client: ImageEngineClient,
        base_model_paths: list[BaseModelPath],
        *,
        lora_modules: list[LoRAModulePath] | None = None,
        lora_defaults: Mapping[str, AdapterDefaults] | None = None,
    ) -> None:
        super().__init__(
            cast("EngineClient", engine_client), base_model_paths, lora_modules=lora_modules
        )
        self.registry = ImageModelRegistry(base_model_paths)
        self.model_config = cast(ModelConfig, _ServedModel(base_model_paths[0].model_path))
        self._image_engine_client = engine_client
        self._static_lora_defaults = dict(lora_defaults or {})
        self.adapter_defaults: dict[str, AdapterDefaults] = {}
        """The defaults of each served adapter that has some, by name: the `lora_modules`'
        from `lora_defaults` (`--image-lora-defaults`), a runtime load's from its body. The
        serving object reads this dict per request: it is changed in place, never replaced."""

    async def init_static_loras(self) -> None:
        """vLLM's, then the `lora_modules`' defaults."""
        await super().init_static_loras()
        self.adapter_defaults.update(self._static_lora_defaults)

    async def show_available_models(self) -> ModelList:
        models = await super().show_available_models()
        unavailable = self._image_engine_client.engine.unavailable_adapters()
        hidden = {
            lora.lora_name
            for lora in self.lora_requests.values()
            if lora.lora_int_id in unavailable
        }
        models.data = [
            card
            if card.parent is None or card.id not in self.adapter_defaults
            # vLLM's cards take extra fields (OpenAI's models do)
            else card.model_copy(update={"defaults": self.adapter_defaults[card.id].given()})
            for card in models.data
            if card.parent is None or card.id not in hidden
        ]
        return models

    async def load_lora_adapter(
        self, request: LoadLoRAAdapterRequest, base_model_name: str | None = None
    ) -> ErrorResponse | str:
        """vLLM's, for a name `adapter_name_problem` accepts (else a 400 naming `lora_name`)
        and a body of vLLM's fields and `defaults` only (`load_defaults`); once loaded, the
        adapter's defaults are the body's (none: the model's). The engine's refusal is a 400
        naming `lora_path`, any other failure a 500 whose message (which might quote the
        adapter's files) goes to the log only."""
        problem = adapter_name_problem(request.lora_name, self._base_names())
        if problem is not None:
            return create_error_response(
                problem,
                err_type="BadRequestError",
                status_code=HTTPStatus.BAD_REQUEST,
                param="lora_name",
            )
        defaults = load_defaults(request)
        if isinstance(defaults, ErrorResponse):
            return defaults
        result = await super().load_lora_adapter(request, base_model_name)
        if not isinstance(result, ErrorResponse):
            # Set as vLLM's load returns, with no await between: loads of one name change its
            # defaults in the order that vLLM's lock of the name ran them.
            self._set_defaults(request.lora_name, defaults)
            return result
        if result.error.code != HTTPStatus.INTERNAL_SERVER_ERROR:
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
        result = await super().unload_lora_adapter(request)
        if not isinstance(result, ErrorResponse):
            self.adapter_defaults.pop(request.lora_name, None)
        return result

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

    def _set_defaults(self, name: str, defaults: AdapterDefaults) -> None:
        if defaults.given():
            self.adapter_defaults[name] = defaults
        else:
            self.adapter_defaults.pop(name, None)


def load_defaults(request: LoadLoRAAdapterRequest) -> AdapterDefaults | ErrorResponse:
    """The `defaults` of a `/v1/load_lora_adapter` body (`NO_ADAPTER_DEFAULTS` without any),
    or a 400: naming `defaults` (or its bad key) for bad ones, naming the field for any other
    field that vLLM's request does not have (none is ignored)."""
    extra = dict(request.model_extra or {})
    given = extra.pop(DEFAULTS_FIELD, None)
    if extra:
        unknown = printable(next(iter(extra)), 64)
        known = [*LoadLoRAAdapterRequest.model_fields, DEFAULTS_FIELD]
        return create_error_response(
            f"'{unknown}' is not a field of /v1/load_lora_adapter (its fields: "
            f"{', '.join(known)}), so it is not read.",
            err_type="BadRequestError",
            status_code=HTTPStatus.BAD_REQUEST,
            param=unknown,
        )
    try:
        return parse_adapter_defaults(given)
    except ValidationError as error:
        key, what = defaults_problem(error)
        param = DEFAULTS_FIELD if key is None else f"{DEFAULTS_FIELD}.{key}"
        return create_error_response(
            f"{param}: {what}",
            err_type="BadRequestError",
            status_code=HTTPStatus.BAD_REQUEST,
            param=param,
        )


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


def lora_defaults_from_args(args: Namespace) -> dict[str, AdapterDefaults]:
    """`--image-lora-defaults` (checked as it was parsed), for adapters of `--lora-modules`
    only, with `--enable-lora`; raises `EngineUnavailableError` naming the flag and the
    adapter."""
    defaults: dict[str, AdapterDefaults] = dict(args.image_lora_defaults or {})
    if defaults and not args.enable_lora:
        raise EngineUnavailableError(
            "--image-lora-defaults needs --enable-lora (as --lora-modules does): add it, or "
            "drop the defaults."
        )
    served = {module.name for module in args.lora_modules or []}
    for name in defaults:
        if name not in served:
            raise EngineUnavailableError(
                f"--image-lora-defaults: adapter {echo(name)} is not one of --lora-modules "
                f"({', '.join(sorted(served)) or 'none'}); adapters loaded later take theirs "
                "from /v1/load_lora_adapter's defaults."
            )
    return defaults


def serving_models_from_args(
    engine_client: ImageEngineClient, args: Namespace
) -> ImageServingModels:
    """The served models of `--served-model-name` and `--lora-modules` (not loaded yet), with
    the adapters' `--image-lora-defaults`; raises `EngineUnavailableError` for bad ones."""
    return ImageServingModels(
        engine_client,
        base_model_paths(args),
        lora_modules=args.lora_modules,
        lora_defaults=lora_defaults_from_args(args),
    )
