"""One `vllm serve tiny-qwen-image --task image --api-key ... --enable-lora --max-loras 2
--lora-modules style=... character=...` subprocess for every end-to-end test: starting vLLM
costs ~25 s on 2 cores, so the modules share it (session scope). It serves two LoRA adapters
(`ADAPTERS`; a request's `lora` may stack both), allows vLLM's runtime adapter loading
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING`), and answers to the aliases the apps written for
OpenAI's image models default to (`SERVED_NAMES`, docs/clients.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.server_process import ServerFailedError, free_port, running_server, vllm_serve_command

from .live_server import API_KEY, SERVED_NAMES


@pytest.fixture(scope="session")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "vllm-serve.log"


@pytest.fixture(scope="session")
def server(
    tiny_model_dir: Path, model_cache: Path, server_log: Path, tiny_loras: dict[str, Path]
) -> Iterator[str]:
    port = free_port()
    log_path = server_log
    # live_server.ADAPTERS; `other` stays free for the tests that load one at runtime.
    modules = [f"style={tiny_loras['style']}", f"character={tiny_loras['third']}"]
    lora = ["--enable-lora", "--max-loras", "2", "--lora-modules", *modules]
    names = ["--served-model-name", *SERVED_NAMES]
    command = vllm_serve_command("tiny-qwen-image", port, "--api-key", API_KEY, *names, *lora)
    try:
        with running_server(
            command,
            port,
            log_path,
            # vLLM's default level, as a user runs it (this test session quiets its own).
            env={
                "VLLM_OMNI_IMAGES_CACHE": str(model_cache),
                "VLLM_LOGGING_LEVEL": "INFO",
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            },
        ) as base_url:
            yield base_url
    except ServerFailedError as error:
        pytest.fail(str(error))
