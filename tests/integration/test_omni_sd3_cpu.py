"""Stable Diffusion 3 on vllm-omni's real engine on the CPU: the tiny SD3 folder
(`testing/tiny_sd3.py`, diffusers' `StableDiffusion3Pipeline` architecture with random weights)
served by vllm-omni's `DiffusionEngine`, worker and SD3 pipeline, extended by this package's
(`pipelines/sd3.py`) for edits and inpainting, against the diffusers engine (diffusers' own
pipeline, and `AutoPipelineForImage2Image` / `AutoPipelineForInpainting` built from it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vllm_omni.diffusion.registry import DiffusionModelRegistry

from testing.tiny_sd3 import TINY_SD3_DEFAULTS, ensure_tiny_sd3
from tests.support.engines import images_of, req
from tests.support.images import gradient_source, left_half_engine_mask
from tests.support.omni import SAME_IMAGE, WorkerProbe, build_engine, difference
from vllm_omni_images.engine.base import EngineRequest, ModelDefaults
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.model_folder import defaults_for_pipeline_class
from vllm_omni_images.engine.omni_engine import OmniEngine

SD3_GUIDANCE = 7.0
"""diffusers' `StableDiffusion3Pipeline` default guidance (classifier-free, with the negative
prompt's encoding)."""


@pytest.fixture(scope="module")
def tiny_sd3_dir(model_cache: Path) -> Path:
    return ensure_tiny_sd3(model_cache)


@pytest.fixture(scope="module")
def sd3_engine(tiny_sd3_dir: Path) -> Iterator[OmniEngine]:
    engine = build_engine(tiny_sd3_dir)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def sd3_runner(tiny_sd3_dir: Path) -> Iterator[DiffusersRunner]:
    runner = DiffusersRunner(str(tiny_sd3_dir), device="cpu")
    yield runner
    runner.close()


def sd3_req(*seeds: int, **fields: object) -> EngineRequest:
    """A request as serving maps one for this model: the model's guidance, said explicitly."""
    return req(*seeds, **{"guidance_scale": SD3_GUIDANCE, "num_inference_steps": 4, **fields})


async def omni_images(engine: OmniEngine, request: EngineRequest) -> list[Image.Image]:
    return await images_of(engine.generate(request))


async def diffusers_images(runner: DiffusersRunner, request: EngineRequest) -> list[Image.Image]:
    [images] = await asyncio.to_thread(runner.run, [request])
    return images


def test_the_package_pipeline_serves_the_sd3_folder(
    tiny_sd3_dir: Path, sd3_engine: OmniEngine, sd3_runner: DiffusersRunner
) -> None:
    """SD3-medium's layout, served by this package's pipeline (registered in vllm-omni in
    place of its own), with the same defaults on both engines."""
    index = json.loads((tiny_sd3_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"] == index["text_encoder_2"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    registered = DiffusionModelRegistry.models["StableDiffusion3Pipeline"].load_model_cls()
    assert registered.__name__ == "ImageTaskSD3Pipeline"
    assert type(WorkerProbe(sd3_engine).pipeline) is registered
    assert sd3_engine.takes_images and sd3_engine.takes_masks
    expected = ModelDefaults(
        width=TINY_SD3_DEFAULTS["width"],
        height=TINY_SD3_DEFAULTS["height"],
        num_inference_steps=TINY_SD3_DEFAULTS["num_inference_steps"],
        size_multiple=16,
        guidance_scale=SD3_GUIDANCE,
        max_side=768,  # its pos_embed_max_size (48) x 2x2 patches x VAE 8
    )
    assert sd3_engine.defaults == sd3_runner.defaults == expected


def test_sd3_defaults_are_sd3s_own(tmp_path: Path) -> None:
    """Without the tiny folder's size and steps: diffusers' `StableDiffusion3Pipeline`'s (128
    latent pixels x 8, 28 steps, guidance 7.0); sizes in multiples of 16, as SD3 checks (its
    image processor's scale is the VAE's 8, its transformer patches 2x2)."""
    assert defaults_for_pipeline_class("StableDiffusion3Pipeline", str(tmp_path)) == ModelDefaults(
        width=1024,
        height=1024,
        num_inference_steps=28,
        size_multiple=16,
        guidance_scale=SD3_GUIDANCE,
    )


@pytest.mark.parametrize(
    "sd3_request",
    [
        pytest.param(sd3_req(7), id="the-models-guidance"),
        pytest.param(sd3_req(7, negative_prompt="blurry"), id="negative-prompt"),
        pytest.param(sd3_req(7, guidance_scale=1.0), id="guidance-1"),
        pytest.param(sd3_req(1, 2), id="a-batch-of-two"),
    ],
)
async def test_generations_give_the_diffusers_engines_images(
    sd3_engine: OmniEngine, sd3_runner: DiffusersRunner, sd3_request: EngineRequest
) -> None:
    omni = await omni_images(sd3_engine, sd3_request)
    diffusers = await diffusers_images(sd3_runner, sd3_request)
    for a, b in zip(omni, diffusers, strict=True):
        assert a.size == b.size == (64, 64)
        assert difference(a, b) <= SAME_IMAGE


@pytest.mark.parametrize(
    ("masked", "strength"),
    [(False, 0.7), (True, 0.7), (True, 1.0)],
    ids=["image-to-image", "inpainting", "inpainting-at-strength-1"],
)
async def test_edits_give_the_diffusers_engines_image(
    sd3_engine: OmniEngine, sd3_runner: DiffusersRunner, masked: bool, strength: float
) -> None:
    """diffusers' `StableDiffusion3Img2ImgPipeline` / `StableDiffusion3InpaintPipeline`, same
    seed and strength: the scheduler's own schedule, truncated; the VAE sample, then the noise;
    the kept region put back after each step (at strength 1, from pure noise)."""
    mask = left_half_engine_mask() if masked else None
    request = sd3_req(4, image=gradient_source(), mask=mask, strength=strength)
    [omni] = await omni_images(sd3_engine, request)
    [diffusers] = await diffusers_images(sd3_runner, request)
    assert difference(omni, diffusers) <= SAME_IMAGE
    [generated] = await omni_images(sd3_engine, sd3_req(4))
    assert difference(omni, generated) > 10 * SAME_IMAGE  # an edit, not a generation
    if masked:
        edited, original = np.asarray(omni, dtype=int), np.asarray(gradient_source(), dtype=int)
        assert np.abs(edited[:, 32:] - original[:, 32:]).max() == 0  # kept as sent


async def test_an_edit_batch_gives_each_request_its_own_image(
    sd3_engine: OmniEngine, sd3_runner: DiffusersRunner
) -> None:
    """vllm-omni batches the two edits (one key: same task and strength)."""
    requests = [sd3_req(seed, image=gradient_source(), strength=0.8) for seed in (5, 6)]
    together = await asyncio.gather(*(omni_images(sd3_engine, r) for r in requests))
    for request, [image] in zip(requests, together, strict=True):
        [alone] = await diffusers_images(sd3_runner, request)
        assert difference(image, alone) <= SAME_IMAGE
    assert difference(together[0][0], together[1][0]) > 10 * SAME_IMAGE
