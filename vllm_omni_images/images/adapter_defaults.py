"""Per-adapter defaults as an operator gives them: the entries of `--image-lora-defaults` and the
`defaults` of `/v1/load_lora_adapter`. Each is a JSON object whose keys are `AdapterDefaults`'
fields, each value held to the range a request may give that field (`ImageGenerationRequest`'s
own field, validated as strictly as a JSON request's); any other key is refused by name."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from vllm_omni_images.engine.base import NO_ADAPTER_DEFAULTS, AdapterDefaults
from vllm_omni_images.images.protocol import ImageGenerationRequest
from vllm_omni_images.images.safe_text import echo, printable

KNOBS: tuple[str, ...] = tuple(knob.name for knob in dataclasses.fields(AdapterDefaults))
"""The request fields an adapter may default, by their request names."""


def _request_field(knob: str) -> Any:
    field = ImageGenerationRequest.model_fields[knob]
    return field.annotation, field


_KNOB_FIELDS: dict[str, Any] = {knob: _request_field(knob) for knob in KNOBS}
AdapterDefaultsBody: type[BaseModel] = create_model(
    "AdapterDefaultsBody", __config__=ConfigDict(extra="forbid", strict=True), **_KNOB_FIELDS
)
"""The JSON shape of one adapter's defaults: `KNOBS`, each as the request holds it."""


def parse_adapter_defaults(value: object) -> AdapterDefaults:
    """`value` (a parsed JSON object; `None`: none) as `AdapterDefaults`; a `null` knob is
    unset. Raises pydantic's `ValidationError` (`loc`: the bad key) for anything else."""
    if value is None:
        return NO_ADAPTER_DEFAULTS
    body = AdapterDefaultsBody.model_validate(value)
    return AdapterDefaults(**body.model_dump(exclude_none=True))


def defaults_problem(error: ValidationError) -> tuple[str | None, str]:
    """pydantic's first complaint about one adapter's defaults: the key it is about (`None`:
    the value as a whole) and what is wrong, in a few words (`Input should be less than or
    equal to 200 (got 500)`)."""
    first = error.errors()[0]
    key = printable(".".join(str(part) for part in first["loc"]), 64) or None
    if first["type"] == "extra_forbidden":
        return key, f"not a key of adapter defaults (they are {', '.join(KNOBS)})"
    if key is None:
        return key, f"must be a JSON object of {', '.join(KNOBS)} (got {echo(first['input'])})"
    return key, f"{first['msg']} (got {echo(first['input'])})"


def defaults_by_adapter(text: str) -> dict[str, AdapterDefaults]:
    """`--image-lora-defaults`: a JSON object of adapter name -> that adapter's defaults;
    `argparse.ArgumentTypeError` naming the adapter and key otherwise. Whether each name is
    served is the launcher's to check."""
    example = '{"NAME": {"num_inference_steps": 8, "true_cfg_scale": 1.0}}'
    try:
        given = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a JSON object like {example}: {error}") from None
    if not isinstance(given, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like {example}")
    defaults = {}
    for name, value in given.items():
        try:
            defaults[name] = parse_adapter_defaults(value)
        except ValidationError as error:
            key, what = defaults_problem(error)
            where = f"adapter '{printable(name, 64)}'" + (f": {key}" if key else "")
            raise argparse.ArgumentTypeError(f"{where}: {what}") from None
    return defaults
