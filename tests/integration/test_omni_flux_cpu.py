"""FLUX.1 on vllm-omni's real engine on the CPU: the tiny FLUX folder (`testing/tiny_flux.py`,
diffusers' `FluxPipeline` architecture with random weights) served by vllm-omni's
`DiffusionEngine`, worker and FLUX pipeline (its own transformer and T5 encoder on vLLM's
layers) on this package's CPU platform, against the diffusers engine.

vllm-omni's T5 encoder builds vLLM's `NewGELU`, which binds `torch.ops._C.gelu_new` on the CPU:
without the CPU platform's native ops (`platforms/cpu_ops.py`) the pipeline does not load.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from testing.tiny_flux import TINY_FLUX_DEFAULTS, ensure_tiny_flux
from tests.support.engines import images_of, req
from tests.support.images import gradient_source, left_half_engine_mask
from tests.support.omni import SAME_IMAGE, build_engine, difference
from vllm_omni_images.engine.base import EngineRequest, ModelDefaults
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.model_folder import defaults_for_pipeline_class
from vllm_omni_images.engine.omni_engine import OmniEngine

FLUX_GUIDANCE = 3.5
"""diffusers' `FluxPipeline` default guidance (FLUX.1-dev's distilled guidance)."""


@pytest.fixture(scope="module")
def tiny_flux_dir(model_cache: Path) -> Path:
    return ensure_tiny_flux(model_cache)


@pytest.fixture(scope="module")
def flux_engine(tiny_flux_dir: Path) -> Iterator[OmniEngine]:
    engine = build_engine(tiny_flux_dir)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def flux_runner(tiny_flux_dir: Path) -> Iterator[DiffusersRunner]:
    runner = DiffusersRunner(str(tiny_flux_dir), device="cpu")
    yield runner
    runner.close()


def flux_req(*seeds: int, **fields: object) -> EngineRequest:
    """A request as serving maps one for this model: the model's guidance, said explicitly."""
    return req(*seeds, **{"guidance_scale": FLUX_GUIDANCE, "num_inference_steps": 3, **fields})


async def omni_images(engine: OmniEngine, request: EngineRequest) -> list[Image.Image]:
    return await images_of(engine.generate(request))


def test_the_folder_is_a_flux_1_pipeline(tiny_flux_dir: Path) -> None:
    index = json.loads((tiny_flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"][1] == "CLIPTokenizer"
    assert index["tokenizer_2"][1] in ("T5Tokenizer", "T5TokenizerFast")
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    transformer = json.loads((tiny_flux_dir / "transformer" / "config.json").read_text())
    assert transformer["guidance_embeds"] is True  # FLUX.1-dev's, as the real folder says


def test_flux_defaults_are_flux_1s_own(tiny_flux_dir: Path, tmp_path: Path) -> None:
    # Without the tiny folder's size and steps: diffusers' FluxPipeline's (128 latent pixels x
    # 8, 28 steps, multiples of 8 x 2x2 patches, guidance 3.5); its scheduler has no terminal
    # shift, so one step makes an image.
    for name in ("model_index.json", "scheduler"):
        source = tiny_flux_dir / name
        if source.is_dir():
            (tmp_path / name).mkdir()
            for file in source.iterdir():
                (tmp_path / name / file.name).write_bytes(file.read_bytes())
        else:
            (tmp_path / name).write_bytes(source.read_bytes())
    assert defaults_for_pipeline_class("FluxPipeline", str(tmp_path)) == ModelDefaults(
        width=1024,
        height=1024,
        num_inference_steps=28,
        size_multiple=16,
        guidance_scale=FLUX_GUIDANCE,
    )


def test_both_engines_read_the_same_defaults(
    flux_engine: OmniEngine, flux_runner: DiffusersRunner
) -> None:
    assert flux_engine.model_class_name == "FluxPipeline"
    expected = ModelDefaults(
        width=TINY_FLUX_DEFAULTS["width"],
        height=TINY_FLUX_DEFAULTS["height"],
        num_inference_steps=TINY_FLUX_DEFAULTS["num_inference_steps"],
        size_multiple=16,
        guidance_scale=FLUX_GUIDANCE,
    )
    assert flux_engine.defaults == expected
    assert flux_runner.defaults == expected


@pytest.mark.parametrize(
    "flux_request",
    [
        pytest.param(flux_req(7), id="the-models-guidance"),
        pytest.param(flux_req(7, guidance_scale=1.0), id="guidance-1"),
        pytest.param(
            flux_req(7, negative_prompt="blurry", true_cfg_scale=4.0), id="negative-prompt-true-cfg"
        ),
        pytest.param(flux_req(7, num_inference_steps=1), id="one-step"),
        pytest.param(flux_req(7, width=96, height=64), id="96x64"),
    ],
)
async def test_the_same_image_as_the_diffusers_engine(
    flux_engine: OmniEngine, flux_runner: DiffusersRunner, flux_request: EngineRequest
) -> None:
    [omni] = await omni_images(flux_engine, flux_request)
    [[diffusers]] = await asyncio.to_thread(flux_runner.run, [flux_request])
    assert omni.size == diffusers.size == (flux_request.width, flux_request.height)
    assert difference(omni, diffusers) <= SAME_IMAGE


async def test_a_batch_gives_each_image_of_its_seed(
    flux_engine: OmniEngine, flux_runner: DiffusersRunner
) -> None:
    """vllm-omni batches the two images (one request each); diffusers runs them as one call."""
    omni = await omni_images(flux_engine, flux_req(1, 2))
    [diffusers] = await asyncio.to_thread(flux_runner.run, [flux_req(1, 2)])
    assert all(difference(a, b) <= SAME_IMAGE for a, b in zip(omni, diffusers, strict=True))
    assert difference(omni[0], omni[1]) > 10 * SAME_IMAGE


async def test_prompt_negative_prompt_and_guidance_change_the_image(
    flux_engine: OmniEngine,
) -> None:
    """The comparisons above are not of images that ignore their inputs."""
    [plain] = await omni_images(flux_engine, flux_req(7))
    variants = [
        flux_req(7, prompt="a green boat"),
        flux_req(7, negative_prompt="blurry", true_cfg_scale=4.0),
        flux_req(7, guidance_scale=1.0),
    ]
    for variant in variants:
        [image] = await omni_images(flux_engine, variant)
        assert difference(plain, image) > 10 * SAME_IMAGE, variant


@pytest.mark.skipif(
    os.environ.get("VLLM_OMNI_IMAGES_PARALLEL_TESTS") != "1",
    reason="a worker process imports vllm-omni anew (minutes on 2 cores): set "
    "VLLM_OMNI_IMAGES_PARALLEL_TESTS=1 to run",
)
async def test_a_worker_process_sets_the_ops_up_too(
    flux_engine: OmniEngine, flux_runner: DiffusersRunner, tiny_flux_dir: Path
) -> None:
    """The `mp` executor's worker process resolves the CPU platform itself, which registers
    the native ops there before vllm-omni's T5 encoder is built. (Last in the module: it
    closes the shared engine, whose in-process worker holds process-wide parallel state.)"""
    request = flux_req(7, negative_prompt="blurry", true_cfg_scale=4.0)
    [[diffusers]] = await asyncio.to_thread(flux_runner.run, [request])
    await flux_engine.close()
    engine = await asyncio.to_thread(build_engine, tiny_flux_dir, distributed_executor_backend="mp")
    try:
        [omni] = await omni_images(engine, request)
    finally:
        await engine.close()
    assert difference(omni, diffusers) <= SAME_IMAGE


@pytest.mark.parametrize("masked", [False, True], ids=["image-to-image", "inpainting"])
async def test_edits_give_the_diffusers_engines_image(
    flux_engine: OmniEngine, flux_runner: DiffusersRunner, masked: bool
) -> None:
    """This package's FLUX pipeline (`pipelines/flux.py`), registered in vllm-omni, against
    diffusers' `FluxImg2ImgPipeline` / `FluxInpaintPipeline`, same seed and strength."""
    assert flux_engine.takes_images and flux_engine.takes_masks
    mask = left_half_engine_mask() if masked else None
    request = flux_req(4, image=gradient_source(), mask=mask, strength=0.7, num_inference_steps=4)
    [omni] = await omni_images(flux_engine, request)
    [[diffusers]] = await asyncio.to_thread(flux_runner.run, [request])
    assert difference(omni, diffusers) <= SAME_IMAGE
    [generated] = await omni_images(flux_engine, flux_req(4, num_inference_steps=4))
    assert difference(omni, generated) > 10 * SAME_IMAGE  # an edit, not a generation


async def test_an_edit_batch_gives_each_request_its_own_image(
    flux_engine: OmniEngine, flux_runner: DiffusersRunner
) -> None:
    requests = [
        flux_req(seed, image=gradient_source(), strength=0.8, num_inference_steps=4)
        for seed in (5, 6)
    ]
    together = await asyncio.gather(*(omni_images(flux_engine, r) for r in requests))
    for request, [image] in zip(requests, together, strict=True):
        [[alone]] = await asyncio.to_thread(flux_runner.run, [request])
        assert difference(image, alone) <= SAME_IMAGE
