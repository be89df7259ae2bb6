"""`vllm serve <Qwen-Image folder> --task image --image-engine omni` on a GPU, end to end.

The folder is the embedded tiny Qwen-Image (the real architecture, reduced depth and width,
random weights), so vllm-omni's own Qwen-Image pipeline and GPU worker load and run it; only
the weights are not the released ones. Skipped on machines without a CUDA GPU, where vllm-omni
has no platform (the CPU suite drives the same engine with a stand-in worker instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from testing.server_process import ServerFailedError, free_port, running_server, vllm_serve_command
from vllm_omni_images.images.encoding import decode_image_base64

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for vllm-omni"),
]


@pytest.fixture(scope="module")
def omni_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("omni-server") / "vllm-serve.log"
    command = vllm_serve_command(str(tiny_model_dir), port, "--image-engine", "omni")
    try:
        with running_server(command, port, log_path, env={"VLLM_LOGGING_LEVEL": "INFO"}) as url:
            assert "Image engine: omni" in log_path.read_text()
            yield url
    except ServerFailedError as error:
        pytest.fail(str(error))


def test_the_omni_engine_serves_the_openai_sdk(omni_server: str) -> None:
    sdk = openai.OpenAI(base_url=f"{omni_server}/v1", api_key="unused", max_retries=0)
    result = sdk.images.generate(
        model=sdk.models.list().data[0].id,
        prompt="a red fox in the snow",
        n=2,
        size="256x256",
        extra_body={"num_inference_steps": 2, "seed": 7},
    )
    assert result.data is not None
    first, second = (np.asarray(decode_image_base64(item.b64_json or "")) for item in result.data)
    assert first.shape == second.shape == (256, 256, 3)
    assert not np.array_equal(first, second)
    again = sdk.images.generate(
        model=sdk.models.list().data[0].id,
        prompt="a red fox in the snow",
        size="256x256",
        extra_body={"num_inference_steps": 2, "seed": 8},
    )
    assert again.data is not None
    assert np.array_equal(np.asarray(decode_image_base64(again.data[0].b64_json or "")), second)
