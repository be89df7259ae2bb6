"""Z-Image on the vllm-omni engine: this package's pipeline (`pipelines/z_image.py`), registered
in place of vllm-omni's, run by vllm-omni's real worker on the CPU from a tiny Z-Image folder
(`testing/tiny_z_image.py`): text-to-image, and edits at a `strength` through the HTTP API,
against diffusers' `ZImagePipeline` and `ZImageImg2ImgPipeline` for the same folder and seed.

vllm-omni's in-process (`uni`) worker sets up process-wide parallel state, so one such engine
lives at a time in a test process: this module runs apart from the other modules' engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from testing.tiny_z_image import build_tiny_z_image
from tests.support.batching import FLAG_DEFAULTS
from tests.support.engines import images_of, req
from tests.support.images import gradient_source, png
from tests.support.omni import SAME_IMAGE, WorkerProbe, build_engine, difference
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.omni_engine import OmniEngine

from .conftest import AppFactory
from .helpers import http_client, pixels

STEPS = 4
GUIDANCE = {"guidance_scale": 2.0, "negative_prompt": "blurry"}

# vllm-omni's Z-Image denoises over its scheduler's own sigmas, from 1 down to 0 (it sets the
# scheduler's sigma_min to 0); diffusers' defaults to 1 down to 1/steps. The reference is asked
# for vllm-omni's schedule.
VLLM_OMNI_SIGMAS = np.linspace(1.0, 0.0, STEPS).tolist()


@pytest.fixture(scope="module")
def z_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_z_image(tmp_path_factory.mktemp("models") / "tiny-z-image")


@pytest.fixture(scope="module")
def omni_engine(z_image_dir: Path) -> Iterator[OmniEngine]:
    """The tiny Z-Image folder's engine (the conftest's `probe` wraps it)."""
    engine = build_engine(z_image_dir, max_batch_size=1)
    yield engine
    asyncio.run(engine.close())


def test_z_image_is_served_by_this_packages_pipeline(
    omni_engine: OmniEngine, probe: WorkerProbe
) -> None:
    """Built at the folder's size (vllm-omni's own builds the released one), taking an input
    image and a strength."""
    from vllm_omni.diffusion.registry import DiffusionModelRegistry

    from vllm_omni_images.pipelines.z_image import ZImageEditPipeline

    assert omni_engine.model_class_name == "ZImagePipeline"
    assert DiffusionModelRegistry._try_load_model_cls("ZImagePipeline") is ZImageEditPipeline
    assert isinstance(probe.pipeline, ZImageEditPipeline)
    assert probe.pipeline.transformer.dim == 32
    assert omni_engine.takes_images and omni_engine.takes_strength
    assert omni_engine.defaults.supports_strength
    # Its RoPE tables' 128 height and width positions (axes_lens) x 2x2 patches x VAE 8.
    assert omni_engine.defaults.max_side == 2048


async def test_generations_and_edits_at_a_strength_are_diffusers_own(
    make_app: AppFactory, omni_engine: OmniEngine, probe: WorkerProbe, z_image_dir: Path
) -> None:
    from diffusers import ZImageImg2ImgPipeline, ZImagePipeline

    probe.reset()
    client = ImageEngineClient(omni_engine, "tiny-z-image", FLAG_DEFAULTS.admission_config())
    [generated] = await images_of(client.generate(req(3, num_inference_steps=STEPS, **GUIDANCE)))
    async with http_client(await make_app(omni_engine)) as http:
        fields = {"prompt": "a red fox", "seed": 3, "strength": 0.6, "num_inference_steps": STEPS}
        response = await http.post(
            "/v1/images/edits",
            data={name: str(value) for name, value in {**fields, **GUIDANCE}.items()},
            files={"image": ("in.png", png(gradient_source()), "image/png")},
        )
    assert response.status_code == 200, response.text
    edited = Image.fromarray(pixels(response.json()["data"][0]["b64_json"]))
    sent = probe.batches[-1][0]
    assert sent.sampling_params.strength == 0.6
    assert isinstance(sent.prompt["multi_modal_data"]["image"], Image.Image)

    pipe = ZImagePipeline.from_pretrained(z_image_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    common = {"prompt": "a red fox", "height": 64, "width": 64, "sigmas": VLLM_OMNI_SIGMAS}
    common |= {"num_inference_steps": STEPS, **GUIDANCE}
    [expected] = pipe(**common, generator=torch.Generator("cpu").manual_seed(3)).images
    assert difference(generated, expected) <= SAME_IMAGE
    img2img = ZImageImg2ImgPipeline.from_pipe(pipe)
    [expected_edit] = img2img(
        **common,
        image=gradient_source(),
        strength=0.6,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images
    assert difference(edited, expected_edit) <= SAME_IMAGE
    assert difference(edited, generated) > SAME_IMAGE  # the input image shaped the edit
