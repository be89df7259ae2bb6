"""`--image-lora-defaults` on vLLM's real serve parser: each adapter's defaults parsed into
`AdapterDefaults`, held to the request's own fields and ranges, and the adapters held to
`--lora-modules` under `--enable-lora` before the model loads (`launcher.lora_settings_from_args`).
Through the HTTP API: tests/integration/test_lora_defaults.py."""

from __future__ import annotations

import argparse
import json

import pytest

from vllm_omni_images.engine.base import AdapterDefaults
from vllm_omni_images.engine.errors import EngineUnavailableError
from vllm_omni_images.server.cli_args import ImageTaskArgs
from vllm_omni_images.server.launcher import lora_settings_from_args

FLAG = "--image-lora-defaults"
LIGHTNING = "lightning=/adapters/lightning"


def parse(parser: argparse.ArgumentParser, *flags: str) -> argparse.Namespace:
    return parser.parse_args(["tiny-qwen-image", "--task", "image", *flags])


def test_each_adapters_defaults_are_parsed(serve_parser: argparse.ArgumentParser) -> None:
    given = {
        "lightning": {"num_inference_steps": 8, "true_cfg_scale": 1},
        "turbo": {"guidance_scale": 0.0, "num_inference_steps": None},
    }
    args = parse(serve_parser, FLAG, json.dumps(given))
    assert ImageTaskArgs.from_args(args).image_lora_defaults == {
        "lightning": AdapterDefaults(num_inference_steps=8, true_cfg_scale=1.0),
        "turbo": AdapterDefaults(guidance_scale=0.0),
    }
    assert ImageTaskArgs.from_args(parse(serve_parser)).image_lora_defaults is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("{not json", "must be a JSON object like"),
        ('["lightning"]', "must be a JSON object like"),
        ('{"lightning": 8}', "adapter 'lightning': must be a JSON object of num_inference_steps"),
        ('{"lightning": {"steps": 8}}', "adapter 'lightning': steps: not a key of adapter"),
        ('{"lightning": {"num_inference_steps": 0}}', "adapter 'lightning': num_inference_steps"),
        ('{"lightning": {"num_inference_steps": 201}}', "adapter 'lightning': num_inference_steps"),
        ('{"lightning": {"num_inference_steps": "8"}}', "adapter 'lightning': num_inference_steps"),
        ('{"lightning": {"num_inference_steps": 8.5}}', "adapter 'lightning': num_inference_steps"),
        ('{"lightning": {"guidance_scale": 20.5}}', "adapter 'lightning': guidance_scale"),
        ('{"lightning": {"true_cfg_scale": -1}}', "adapter 'lightning': true_cfg_scale"),
        ('{"lightning": {"true_cfg_scale": true}}', "adapter 'lightning': true_cfg_scale"),
    ],
)
def test_bad_defaults_stop_the_command_line_naming_the_flag_and_the_adapter(
    serve_parser: argparse.ArgumentParser,
    capsys: pytest.CaptureFixture[str],
    value: str,
    says: str,
) -> None:
    with pytest.raises(SystemExit):
        parse(serve_parser, FLAG, value)
    error = capsys.readouterr().err
    assert f"argument {FLAG}: " in error and says in error


def test_the_adapters_must_be_served_with_enable_lora(
    serve_parser: argparse.ArgumentParser,
) -> None:
    defaults = json.dumps({"lightning": {"num_inference_steps": 8}})
    without_lora = parse(serve_parser, FLAG, defaults)
    with pytest.raises(EngineUnavailableError, match=rf"^{FLAG} needs --enable-lora"):
        lora_settings_from_args(without_lora)
    not_served = parse(serve_parser, "--enable-lora", "--lora-modules", "other=/o", FLAG, defaults)
    with pytest.raises(
        EngineUnavailableError,
        match=rf"^{FLAG}: adapter 'lightning' is not one of --lora-modules \(other\)",
    ):
        lora_settings_from_args(not_served)
    served = parse(serve_parser, "--enable-lora", "--lora-modules", LIGHTNING, FLAG, defaults)
    assert lora_settings_from_args(served) is not None
