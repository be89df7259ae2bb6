"""LlamaIndex's `TextToImageToolSpec` (llama-index-tools-text-to-image 0.6.0, the newest;
llama_index/tools/text_to_image/base.py) run for real against `vllm serve`.

Its code calls the openai SDK's module-level API of before 1.0: `openai.Image.create(prompt,
n, size)` (no `model`, no `response_format`; 256x256 unless the agent says otherwise), then
reads `data[i]["url"]`; `openai.Image.create_variation(image=<bytes GET from a url>, n, size)`
the same way; errors are caught as `openai.error.OpenAIError`. Yet it requires `openai>=1.1.0`,
so as installed it cannot run against any server; on openai 0.28.1 (testing/clients/openai0)
it runs, set up by `OPENAI_API_BASE` and `OPENAI_API_KEY`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.image_answers import png_at

from .environments import API_KEY, CLIENTS_ENV, OPENAI0_ENV, client_env

pytestmark = pytest.mark.e2e

TOOL = Path(__file__).with_name("text_to_image_tool.py")


def run_tool(environment: Path, server: str) -> subprocess.CompletedProcess[str]:
    """The tool, in `environment`'s Python, pointed at `server` by the openai SDK's settings."""
    env = client_env(OPENAI_API_BASE=f"{server}/v1", OPENAI_API_KEY=API_KEY)
    command = [str(environment / "bin" / "python"), str(TOOL), "a red lighthouse", "64x64"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def test_the_tool_as_installed_fails_in_the_openai_sdk_before_sending(server):
    """openai>=1.0 answers `openai.Image.create` with `APIRemovedInV1`, and the tool's own
    `except openai.error.OpenAIError` then fails too: no server can help."""
    result = run_tool(CLIENTS_ENV, server)
    assert result.returncode != 0, result.stdout
    assert "openai.lib._old_api.APIRemovedInV1" in result.stderr, result.stderr
    assert "AttributeError: module 'openai' has no attribute 'error'" in result.stderr


def test_the_tool_on_openai_0_28_generates_and_varies_images_at_urls_that_open(server):
    result = run_tool(OPENAI0_ENV, server)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(answers["generated"], list), answers
    [generated] = answers["generated"]
    [variation] = answers["variations"]
    assert generated != variation
    for url in (generated, variation):
        assert url.startswith(f"{server}/images/files/"), url
        assert png_at(url).size == (64, 64)
