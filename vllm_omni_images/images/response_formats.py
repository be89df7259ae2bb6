"""What a request's `response_format` is when it names none: the server's
`--image-default-response-format`, by default OpenAI's own rule by model name. Imports nothing
heavy: the flags read it in every vLLM process."""

from __future__ import annotations

from typing import Literal, get_args

ResponseFormat = Literal["b64_json", "url"]
DefaultResponseFormat = Literal["auto", "b64_json", "url"]
"""`--image-default-response-format`: `auto` follows OpenAI's rule by model name."""
DEFAULT_RESPONSE_FORMATS: tuple[DefaultResponseFormat, ...] = get_args(DefaultResponseFormat)

URL_MODEL_PREFIX = "dall-e-"
"""OpenAI answers `url` by default for its DALL-E models, `b64_json` for every other."""


def default_response_format(setting: DefaultResponseFormat, model_name: str) -> ResponseFormat:
    """The `response_format` of a request that sends none, to the served name `model_name`:
    the server's `setting`, or for `auto` OpenAI's own rule: `url` for a `dall-e-*` name (what
    clients written for DALL-E read), `b64_json` for any other (as GPT image models answer)."""
    if setting != "auto":
        return setting
    return "url" if model_name.startswith(URL_MODEL_PREFIX) else "b64_json"
