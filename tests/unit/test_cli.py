import argparse

import pytest

from vllm_omni_images.server.cli_args import (
    add_image_cli_args,
    asks_for_image_task,
    asks_for_serve_help,
)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["vllm", "serve", "m", "--task", "image"], True),
        (["vllm", "serve", "m", "--task=image"], True),
        (["vllm", "serve", "--task", "image", "m"], True),
        (["vllm", "serve", "m"], False),
        (["vllm", "serve", "m", "--task"], False),
        (["vllm", "serve", "m", "--task", "generate"], False),
        (["vllm", "bench", "serve", "--task", "image"], False),
        (["vllm"], False),
    ],
)
def test_asks_for_image_task(argv, expected):
    assert asks_for_image_task(argv) is expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["vllm", "serve", "--help"], True),
        (["vllm", "serve", "-h"], True),
        (["vllm", "serve", "--help=ImageTask"], True),
        (["vllm", "serve", "m"], False),
        (["vllm", "--help"], False),
        (["vllm", "bench", "serve", "--help"], False),
    ],
)
def test_asks_for_serve_help(argv, expected):
    assert asks_for_serve_help(argv) is expected


def test_image_flags_parse_and_are_added_once():
    parser = argparse.ArgumentParser(prog="vllm serve")
    add_image_cli_args(parser)
    add_image_cli_args(parser)
    args = parser.parse_args(["--task", "image", "--image-engine", "diffusers"])
    assert args.task == "image"
    assert args.image_engine == "diffusers"
    defaults = parser.parse_args([])
    assert defaults.task is None and defaults.image_engine == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "video"])


def test_the_timeout_reaches_admission_and_the_hang_grace_the_engine(serve_parser):
    from vllm_omni_images.server.launcher import (
        admission_config_from_args,
        batching_config_from_args,
    )

    defaults = serve_parser.parse_args(["m", "--task", "image"])
    assert admission_config_from_args(defaults).request_timeout_s == 600.0
    assert batching_config_from_args(defaults).hang_grace_s == 60.0
    flags = ["--image-request-timeout", "0", "--image-engine-hang-grace", "0"]
    off = serve_parser.parse_args(["m", "--task", "image", *flags])
    assert admission_config_from_args(off).request_timeout_s is None
    assert batching_config_from_args(off).hang_grace_s is None
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["m", "--task", "image", "--image-engine-hang-grace", "-1"])


def test_the_batching_flags_reach_both_engines_in_one_config(serve_parser):
    from vllm_omni_images.server.launcher import engine_settings_from_args

    flags = ["--image-max-batch-size", "3", "--image-batch-delay-ms", "250"]
    settings = engine_settings_from_args(serve_parser.parse_args(["m", "--task", "image", *flags]))
    assert (settings.batching.max_batch_size, settings.batching.batch_delay_s) == (3, 0.25)
