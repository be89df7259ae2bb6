import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_omni_images.server.cli_args import (
    ImageTaskArgs,
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


def test_the_flags_import_no_pil_torch_or_vllm():
    """The general plugin reads them in every vLLM process, a CPU-only API server included."""
    code = (
        "import sys, vllm_omni_images.server.cli_args; "
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'PIL', 'torch', 'vllm'}))"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert result.stdout.strip() == "[]"


def test_the_timeout_reaches_admission_and_the_hang_grace_the_engine(serve_parser):
    defaults = ImageTaskArgs.from_args(serve_parser.parse_args(["m", "--task", "image"]))
    assert defaults == ImageTaskArgs(task="image")  # the flags' defaults are the fields'
    assert defaults.admission_config().request_timeout_s == 600.0
    assert defaults.batching_config().hang_grace_s == 60.0
    flags = ["--image-request-timeout", "0", "--image-engine-hang-grace", "0"]
    off = ImageTaskArgs.from_args(serve_parser.parse_args(["m", "--task", "image", *flags]))
    assert off.admission_config().request_timeout_s is None
    assert off.batching_config().hang_grace_s is None
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["m", "--task", "image", "--image-engine-hang-grace", "-1"])


def test_the_batching_flags_reach_both_engines_in_one_config(serve_parser):
    from vllm_omni_images.server.launcher import engine_settings_from_args

    flags = ["--image-max-batch-size", "3", "--image-batch-delay-ms", "250"]
    settings = engine_settings_from_args(serve_parser.parse_args(["m", "--task", "image", *flags]))
    assert (settings.batching.max_batch_size, settings.batching.batch_delay_ms) == (3, 250)


def test_the_lora_flags_reach_the_engines_checked_as_vllm_checks_them(serve_parser):
    from vllm_omni_images.engine.base import LoRASettings
    from vllm_omni_images.engine.errors import EngineUnavailableError
    from vllm_omni_images.server.launcher import lora_settings_from_args

    def settings(*flags: str) -> LoRASettings | None:
        return lora_settings_from_args(serve_parser.parse_args(["m", "--task", "image", *flags]))

    assert settings() is None
    assert settings("--enable-lora") == LoRASettings(max_loras=1, max_cpu_loras=1)
    assert settings(
        "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "5", "--max-lora-rank", "32"
    ) == LoRASettings(max_loras=2, max_cpu_loras=5, max_lora_rank=32)
    with pytest.raises(EngineUnavailableError, match="--lora-modules needs --enable-lora"):
        settings("--lora-modules", "style=/adapters/style")
    with pytest.raises(EngineUnavailableError, match="max_cpu_loras"):
        settings("--enable-lora", "--max-loras", "3", "--max-cpu-loras", "2")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("m", "the base model's served name"),
        ("qwen", "the base model's served name"),
        ("org/style", "not a valid adapter name"),
        ("a" * 65, "at most 64 characters"),
        ("_style", "must start with a letter or digit"),
        ("style v2", "not a valid adapter name"),
    ],
)
def test_lora_modules_names_are_checked_before_the_model_loads(
    serve_parser, name: str, why: str
) -> None:
    """An adapter's name is a served name: never a base model's, and of one pattern."""
    from vllm_omni_images.engine.errors import EngineUnavailableError
    from vllm_omni_images.server.launcher import lora_settings_from_args

    flags = ["--enable-lora", "--served-model-name", "m", "qwen"]
    assert lora_settings_from_args(
        serve_parser.parse_args(["m", "--task", "image", *flags, "--lora-modules", "s.v2_x-1=/a"])
    )
    args = serve_parser.parse_args(["m", "--task", "image", *flags, "--lora-modules", f"{name}=/a"])
    with pytest.raises(EngineUnavailableError, match=r"^--lora-modules: lora_name ") as refused:
        lora_settings_from_args(args)
    assert why in str(refused.value) and len(str(refused.value)) < 400


def test_the_model_flags_reach_the_engines(serve_parser):
    from vllm_omni_images.engine.model_source import ModelSource
    from vllm_omni_images.server.launcher import engine_settings_from_args, model_source_from_args

    flags = ["--dtype", "bfloat16", "--revision", "v2", "--download-dir", "/models"]
    args = serve_parser.parse_args(
        ["org/model", "--task", "image", *flags, "--trust-remote-code", "--enforce-eager"]
    )
    settings = engine_settings_from_args(args)
    assert (settings.dtype, settings.trust_remote_code) == ("bfloat16", True)
    assert settings.enforce_eager and "enforce_eager" not in settings.omni_options
    assert model_source_from_args(args) == ModelSource(
        revision="v2", download_dir="/models", trust_remote_code=True
    )


def test_the_image_store_flags_choose_the_store_and_refuse_what_does_not_go_together(
    serve_parser, tmp_path
):
    from vllm_omni_images.images.file_store import ImageStoreError, LocalImageStore
    from vllm_omni_images.images.s3_store import S3ImageStore, S3Location
    from vllm_omni_images.server.endpoint import image_store_from_args

    def store(*flags: str):
        return image_store_from_args(
            serve_parser.parse_args(["tiny-qwen-image", "--task", "image", *flags])
        )

    local = store("--image-store-dir", str(tmp_path), "--image-store-max-mb", "2")
    assert isinstance(local, LocalImageStore) and local.max_bytes == 2 * 1024 * 1024
    s3 = store("--image-store-url", "s3://bucket/a/b", "--image-urls", "presigned")
    assert isinstance(s3, S3ImageStore) and s3.presigned_urls
    assert s3.location == S3Location("bucket", "a/b/") and s3.ttl_s == 3600.0
    with pytest.raises(ImageStoreError, match="--image-store-dir, --image-store-max-mb apply"):
        store("--image-store-url", "s3://b", "--image-store-dir", "x", "--image-store-max-mb", "1")
    with pytest.raises(ImageStoreError, match="presigned needs an object store"):
        store("--image-urls", "presigned")
    with pytest.raises(ImageStoreError, match="--image-store-url: 'http://b' is not an S3 URL"):
        store("--image-store-url", "http://b")
    with pytest.raises(ImageStoreError, match="7 days"):
        store("--image-store-url", "s3://b", "--image-urls", "presigned", "--image-url-ttl", "1e6")
    with pytest.raises(ImageStoreError, match="--image-url-base applies to the server's own"):
        store("--image-store-url", "s3://b", "--image-urls", "presigned",
              "--image-url-base", "https://images.example.com")  # fmt: skip
    for refused in (["--image-urls", "public"], ["--image-url-base", "images.example.com"]):
        with pytest.raises(SystemExit):
            store(*refused)
