"""Shared fixtures: no test reaches a model hub, and the tiny model is built once per run."""

from __future__ import annotations

import gc
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# vLLM imports humming (its quantized-kernel library), which at import starts two Python
# processes in the background to compile its CUDA launcher; without CUDA they fail, after ~5 s of
# CPU, in this process, in each `vllm serve` the tests start and in each vllm-omni worker
# process. humming's own switch turns them off (they inherit it); nothing else changes.
os.environ.setdefault("HUMMING_DISABLE_PARALLEL_BUILD", "1")

import torch

if not torch.cuda.is_available():
    # vLLM's CPU platform, chosen by vLLM itself in this process and in vllm-omni's workers, as
    # `vllm serve --task image` arranges on a machine without a GPU (vllm_patches.py).
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.s3 import S3Server


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder of this run's own; the engine resolves `tiny-qwen-image` through it."""
    from vllm_omni_images.tiny_model import CACHE_ENV_VAR

    cache = tmp_path_factory.mktemp("model-cache")
    os.environ[CACHE_ENV_VAR] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache: Path) -> Path:
    from vllm_omni_images.tiny_model import ensure_tiny_model

    return ensure_tiny_model(model_cache)


@pytest.fixture(scope="session")
def serve_parser():
    """vLLM's real `vllm serve` parser, with our general plugin loaded as vLLM loads it."""
    from vllm_omni_images.server.serve_flags import live_serve_parser

    return live_serve_parser()


@pytest.fixture(scope="session")
def tiny_loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three random LoRA adapters of the tiny model in diffusers' format, by name."""
    from testing.tiny_lora import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return {
        name: build_tiny_lora(tiny_model_dir, root / name, seed=seed)
        for seed, name in enumerate(("style", "other", "third"), start=1)
    }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API server (moto's server mode) on a free port, for the whole run."""
    from tests.support.s3 import S3Server, wait_until_up

    server = S3Server()
    server.start()
    wait_until_up(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process's AWS_* environment pointed at the test S3 server, for the test's length."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


def pytest_collection_finish(session: pytest.Session) -> None:
    """Take everything collection imported (torch, vLLM, vllm-omni, diffusers: ~850,000
    objects) out of the garbage collector's sight. A full collection otherwise walks them all
    (~2 s of CPU on 2 cores), and full collections are frequent here: vllm-omni's engine runs
    four per build and one per close, and Python runs one each time the tests' own objects pile
    up. What the tests make afterwards is collected as before."""
    gc.collect()
    gc.freeze()
