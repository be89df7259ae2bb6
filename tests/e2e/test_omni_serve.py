"""`vllm serve tiny-qwen-image --task image --image-engine omni`, end to end, on any machine.

vllm-omni's own Qwen-Image pipeline and worker load the tiny folder (the real architecture,
random weights) and make the images: on a GPU through vllm-omni's platform, here through this
package's CPU platform. The server runs as a user's does by default: vllm-omni's in-process
`uni` executor (one device). Worker processes (the `mp` executor: one worker, and two with
`--cfg-parallel-size 2` or `--ulysses-degree 2`) are checked by
tests/integration/test_omni_parallel_cpu.py, on request: each worker process imports vllm-omni
anew, about 50 s more a start on 2 cores, which `make test` has no room for.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from testing.server_process import ServerFailedError, free_port, running_server, vllm_serve_command
from tests.support.image_answers import prompt_token_counter
from vllm_omni_images.images.encoding import decode_image_base64

from .live_server import API_KEY

pytestmark = pytest.mark.e2e

SAME_IMAGE = 2
"""Largest pixel difference (of 255) between two makings of one image (float rounding)."""

GUIDED = {"num_inference_steps": 3, "negative_prompt": "blurry", "true_cfg_scale": 4.0}


def generate(
    sdk: openai.OpenAI, seed: int, n: int = 1, model: str = "tiny-qwen-image"
) -> list[np.ndarray]:
    result = sdk.images.generate(
        model=model,
        prompt="a red fox in the snow",
        n=n,
        size="128x128",
        extra_body={**GUIDED, "seed": seed},
    )
    assert result.data is not None
    return [np.asarray(decode_image_base64(item.b64_json or "")) for item in result.data]


@pytest.fixture(scope="module")
def omni_server(
    tiny_model_dir: Path,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_loras: dict[str, Path],
) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("omni-server") / "vllm-serve.log"
    command = vllm_serve_command(
        "tiny-qwen-image",
        port,
        "--image-engine",
        "omni",
        "--enable-lora",
        "--lora-modules",
        f"style={tiny_loras['style']}",  # the adapter the shared e2e server serves too
    )
    env = {"VLLM_OMNI_IMAGES_CACHE": str(model_cache), "VLLM_LOGGING_LEVEL": "INFO"}
    try:
        with running_server(command, port, log_path, env=env, startup_timeout_s=240) as url:
            yield url, log_path
    except ServerFailedError as error:
        pytest.fail(str(error))
    # Stopped with Ctrl-C, as a user stops it: the server and its workers exit cleanly.
    assert "Traceback" not in log_path.read_text()


def difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_the_omni_engine_serves_the_openai_sdk(
    omni_server: tuple[str, Path], tiny_model_dir: Path
) -> None:
    url, log_path = omni_server
    log = log_path.read_text()
    assert "Image engine: omni" in log
    assert "OmniPlatform plugin image_task is activated" in log
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in sdk.models.list().data] == ["tiny-qwen-image", "style"]
    first, second = generate(sdk, seed=7, n=2)
    assert first.shape == second.shape == (128, 128, 3)
    assert difference(first, second) > 10 * SAME_IMAGE
    [again] = generate(sdk, seed=8)
    assert difference(again, second) <= SAME_IMAGE  # image i depends on seed i alone
    # usage, as on the diffusers engine: the prompt by the folder's tokenizer, which the omni
    # engine reads in the API process (its pipeline runs in a worker).
    prompt = "a red fox in the snow"
    count = prompt_token_counter(tiny_model_dir)
    text = count(prompt) + count(str(GUIDED["negative_prompt"]))  # and the negative prompt's
    usage = sdk.images.generate(prompt=prompt, size="64x64", extra_body=GUIDED).usage
    assert usage is not None and usage.input_tokens_details.text_tokens == text > 0
    assert (usage.output_tokens, usage.total_tokens) == (16, text + 16)
    # vLLM's load gauges are exported as by the diffusers engine's server, idle again.
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert f'{gauge}{{engine="0",model_name="tiny-qwen-image"}} 0.0' in metrics


def test_the_same_image_as_the_diffusers_engine(omni_server: tuple[str, Path], server: str) -> None:
    """The shared e2e server runs the diffusers engine on the same model."""
    url, _ = omni_server
    omni = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    diffusers = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    [from_omni] = generate(omni, seed=42)
    [from_diffusers] = generate(diffusers, seed=42)
    assert difference(from_omni, from_diffusers) <= SAME_IMAGE


def test_the_adapter_gives_the_diffusers_engines_image(
    omni_server: tuple[str, Path], server: str
) -> None:
    """Both servers serve the same `style` adapter: vllm-omni's LoRA manager in its worker and
    diffusers' PEFT layers make the same image."""
    url, _ = omni_server
    omni = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    diffusers = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    [from_omni] = generate(omni, seed=42, model="style")
    [from_diffusers] = generate(diffusers, seed=42, model="style")
    assert difference(from_omni, from_diffusers) <= SAME_IMAGE
    [base] = generate(omni, seed=42)
    assert difference(from_omni, base) > 5 * SAME_IMAGE


def test_edits_masks_and_variations_give_the_diffusers_engines_images(
    omni_server: tuple[str, Path], server: str
) -> None:
    """This package's Qwen-Image pipeline, registered in vllm-omni by its plugin entry point
    in the `vllm serve` process, edits as the diffusers engine does."""
    url, _ = omni_server
    source = io.BytesIO()
    ramp = np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None].repeat(128, 0).repeat(3, 2)
    Image.fromarray(ramp).save(source, format="PNG")
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 128))  # the left half is edited
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")
    image = ("in.png", source.getvalue(), "image/png")
    extra = {"seed": 3, "num_inference_steps": 3, "strength": 0.8}
    made = []
    for base_url, key in ((url, "unused"), (server, API_KEY)):
        sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
        edit = sdk.images.edit(image=image, prompt="a fox", extra_body=extra)
        masked = sdk.images.edit(
            image=image,
            mask=("mask.png", mask_png.getvalue(), "image/png"),
            prompt="a fox",
            extra_body=extra,
        )
        variation = sdk.images.create_variation(image=image, extra_body=extra)
        made.append(
            [
                np.asarray(decode_image_base64(result.data[0].b64_json or ""))
                for result in (edit, masked, variation)
                if result.data
            ]
        )
    omni, diffusers = made
    assert len(omni) == len(diffusers) == 3
    for a, b in zip(omni, diffusers, strict=True):
        assert difference(a, b) <= SAME_IMAGE
    assert difference(omni[1][:, 64:], ramp[:, 64:]) == 0  # kept as sent
