"""The client apps that cannot share the main lock with vLLM (testing/clients/), each run as a
process of its own environment against one `vllm serve` for this directory.

`make test-clients` makes the environments and runs these tests by their path; `make test`
does not collect them (setup.cfg's `--ignore`), and without the environments each test here is
skipped, saying how to make them. Nothing a client process does may leave this machine: its
HTTP(S) proxy is a closed local port, bypassed only for 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.server_process import ServerFailedError, free_port, running_server, vllm_serve_command

from .environments import API_KEY, CLIENTS_ENV, OPENAI0_ENV, SERVED_NAMES


@pytest.fixture(scope="session", autouse=True)
def client_environments() -> None:
    missing = [env.name for env in (CLIENTS_ENV, OPENAI0_ENV) if not (env / "bin").is_dir()]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} missing: `make test-clients` makes the client "
            "environments, then runs these tests"
        )


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, model_cache: Path, tmp_path_factory) -> Iterator[str]:
    """`vllm serve tiny-qwen-image --task image --served-model-name dall-e-2 tiny-qwen-image
    gpt-image-1 --api-key clients-secret`, for every test here."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    names = ["--served-model-name", *SERVED_NAMES]
    command = vllm_serve_command("tiny-qwen-image", port, *names, "--api-key", API_KEY)
    env = {"VLLM_OMNI_IMAGES_CACHE": str(model_cache)}
    try:
        with running_server(command, port, log_path, env=env) as base_url:
            yield base_url
    except ServerFailedError as error:
        pytest.fail(str(error))
