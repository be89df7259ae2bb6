"""Edits, inpainting and variations on vllm-omni's engine: this package's Qwen-Image pipeline
(`pipelines/qwen_image.py`), registered in vllm-omni through its plugin entry point, run by
vllm-omni's real worker on the CPU in request mode (step mode: test_omni_previews.py), against
the diffusers engine's img2img and inpaint pipelines for the same seed, strength and mask."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vllm_omni.diffusion.registry import DiffusionModelRegistry

from tests.support.batching import FLAG_DEFAULTS
from tests.support.engines import images_of, req
from tests.support.images import gradient_source, left_half_engine_mask
from tests.support.omni import (
    SAME_IMAGE,
    WorkerProbe,
    batch_sizes,
    build_engine,
    difference,
    until_waiting_in_vllm_omni,
)
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.omni_engine import OmniEngine

from .conftest import AppFactory
from .helpers import FAST, pixels, sdk_client

EDIT = {"num_inference_steps": 4, "strength": 0.7}


@pytest.fixture(scope="module")
def omni_engine(tiny_model_dir: Path) -> Iterator[OmniEngine]:
    """vllm-omni's request mode (a batch per call); its step mode runs these edits in
    test_omni_previews.py, whose engine streams (streaming output runs step mode)."""
    engine = build_engine(tiny_model_dir, max_batch_size=4)
    yield engine
    asyncio.run(engine.close())


def client_of(engine: OmniEngine) -> ImageEngineClient:
    return ImageEngineClient(engine, "tiny-qwen-image", FLAG_DEFAULTS.admission_config())


async def omni_images(engine: OmniEngine, request: EngineRequest) -> list[Image.Image]:
    return await images_of(client_of(engine).generate(request))


async def diffusers_images(runner: DiffusersRunner, request: EngineRequest) -> list[Image.Image]:
    [images] = await asyncio.to_thread(runner.run, [request])
    return images


def test_the_package_pipeline_serves_qwen_image(
    omni_engine: OmniEngine, worker: WorkerProbe
) -> None:
    """Registered through vllm-omni's general-plugin entry point, in place of its own."""
    registered = DiffusionModelRegistry.models["QwenImagePipeline"].load_model_cls()
    assert registered.__name__ == "ImageTaskQwenImagePipeline"
    assert omni_engine.takes_images and omni_engine.takes_masks
    assert type(worker.pipeline) is registered


async def test_an_edit_gives_the_diffusers_engines_image(
    omni_engine: OmniEngine, tiny_runner: DiffusersRunner
) -> None:
    engine = omni_engine
    request = req(5, image=gradient_source(), **EDIT)
    [omni] = await omni_images(engine, request)
    [diffusers] = await diffusers_images(tiny_runner, request)
    assert difference(omni, diffusers) <= SAME_IMAGE
    # An edit, not a generation: it starts from the image, part of the way (the tiny model's
    # random VAE maps every input to about the same latents, so the input itself shows little).
    [generated] = await omni_images(engine, req(5, num_inference_steps=4))
    assert difference(omni, generated) > 10 * SAME_IMAGE


async def test_inpainting_gives_the_diffusers_engines_image_and_keeps_the_rest(
    omni_engine: OmniEngine, tiny_runner: DiffusersRunner
) -> None:
    engine = omni_engine
    request = req(6, image=gradient_source(), mask=left_half_engine_mask(), **EDIT)
    [omni] = await omni_images(engine, request)
    [diffusers] = await diffusers_images(tiny_runner, request)
    assert difference(omni, diffusers) <= SAME_IMAGE
    edited, original = np.asarray(omni, dtype=int), np.asarray(gradient_source(), dtype=int)
    assert np.abs(edited[:, 32:] - original[:, 32:]).max() == 0  # kept as sent
    assert np.abs(edited[:, :31] - original[:, :31]).mean() > 10  # changed


async def test_the_default_strength_is_the_diffusers_engines(
    omni_engine: OmniEngine, tiny_runner: DiffusersRunner
) -> None:
    request = req(8, image=gradient_source(), num_inference_steps=5)  # strength unset: 0.6 on both
    [omni] = await omni_images(omni_engine, request)
    [diffusers] = await diffusers_images(tiny_runner, request)
    assert difference(omni, diffusers) <= SAME_IMAGE


async def test_generations_edits_and_inpaints_sent_together_run_apart(
    omni_engine: OmniEngine, worker: WorkerProbe
) -> None:
    """vllm-omni's pipeline reads a batch's first request for all: the pre-process key keeps
    tasks and strengths apart, like requests still batch, and each request gets the image it
    gets alone."""
    requests = [
        req(1, num_inference_steps=4),  # runs first, alone, while the rest queue
        req(2, image=gradient_source(), **EDIT),
        req(7, image=gradient_source(1), **EDIT),  # batches with the edit before it
        req(3, image=gradient_source(), mask=left_half_engine_mask(), **EDIT),
        req(5, num_inference_steps=4),
        req(4, image=gradient_source(), num_inference_steps=4, strength=0.9),
    ]
    worker.hold.clear()
    first = asyncio.create_task(omni_images(omni_engine, requests[0]))
    await until(worker.denoising.is_set, "the first request to run", timeout_s=ENGINE_WAIT_S)
    rest = asyncio.gather(*(omni_images(omni_engine, r) for r in requests[1:]))
    await until_waiting_in_vllm_omni(omni_engine, len(requests) - 1)
    worker.hold.set()
    mixed = [await first, *await rest]
    for batch in worker.batches:
        assert len({r.batch_compatibility_key for r in batch}) == 1
    assert batch_sizes(worker) == [1, 2, 1, 1, 1]
    for request, [image] in zip(requests, mixed, strict=True):
        [alone] = await omni_images(omni_engine, request)
        assert difference(image, alone) <= SAME_IMAGE


async def test_edits_inpaints_and_variations_through_the_api_match_the_diffusers_engine(
    make_app: AppFactory, omni_engine: OmniEngine, tiny_runner: DiffusersRunner
) -> None:
    buffer = io.BytesIO()
    gradient_source().save(buffer, format="PNG")
    png = buffer.getvalue()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # OpenAI's convention: transparent is edited
    mask_buffer = io.BytesIO()
    mask.save(mask_buffer, format="PNG")
    extra = {**FAST, "seed": 9, "strength": 0.8}
    answers = []
    for engine in (omni_engine, tiny_runner):
        async with sdk_client(await make_app(engine)) as sdk:
            edit = await sdk.images.edit(
                image=("in.png", png, "image/png"), prompt="a fox", extra_body=extra
            )
            inpaint = await sdk.images.edit(
                image=("in.png", png, "image/png"),
                mask=("mask.png", mask_buffer.getvalue(), "image/png"),
                prompt="a fox",
                extra_body=extra,
            )
            variation = await sdk.images.create_variation(
                image=("in.png", png, "image/png"), extra_body=extra
            )
        answers.append([edit, inpaint, variation])
    for omni, diffusers in zip(*answers, strict=True):
        a = pixels(omni.data[0].b64_json or "").astype(int)
        b = pixels(diffusers.data[0].b64_json or "").astype(int)
        assert np.abs(a - b).max() <= SAME_IMAGE
