"""Previews (`partial_images`) on the vllm-omni engine: vllm-omni's real engine in streaming
output (`--diffusion-streaming-output`, step mode), its real worker and Qwen-Image pipeline with
`StepPreviews` on CPU, one engine shared by the module (one such engine lives at a time in a
process, so this module runs apart from the other omni modules' engines)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.engines import images_of, req
from tests.support.omni import (
    SAME_IMAGE,
    WorkerProbe,
    build_engine,
    difference,
    until_waiting_in_vllm_omni,
)
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.base import EngineOutput, FinalImages, ImagesStarted, PreviewImages
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.errors import EngineError
from vllm_omni_images.engine.omni_engine import OmniEngine
from vllm_omni_images.pipelines.qwen_image import ImageTaskQwenImagePipeline
from vllm_omni_images.pipelines.step_previews import StepPreviews

from .conftest import AppFactory
from .helpers import pixels, sdk_client, stream_and_plain

STEPS = 4


@pytest.fixture(scope="module")
def omni_engine(tiny_model_dir: Path) -> Iterator[OmniEngine]:
    # --vae-use-slicing: a flag vllm-omni's registry applies when it builds the pipeline.
    engine = build_engine(tiny_model_dir, diffusion_streaming_output=True, vae_use_slicing=True)
    yield engine
    asyncio.run(engine.close())


async def outputs_of(
    engine: OmniEngine, *seeds: int, partial_images: int = 0
) -> list[EngineOutput]:
    request = req(*seeds, num_inference_steps=STEPS, partial_images=partial_images)
    return [output async for output in engine.generate(request)]


def previews_in(outputs: list[EngineOutput]) -> list[list[Image.Image]]:
    previews = [output for output in outputs if isinstance(output, PreviewImages)]
    assert [preview.index for preview in previews] == list(range(len(previews)))
    return [preview.images for preview in previews]


def final_in(outputs: list[EngineOutput]) -> list[Image.Image]:
    assert isinstance(outputs[-1], FinalImages)
    return outputs[-1].images


def most_different(images: list[Image.Image], others: list[Image.Image]) -> int:
    return max(difference(a, b) for a, b in zip(images, others, strict=True))


def test_the_worker_runs_the_registry_pipeline_with_previews(
    omni_engine: OmniEngine, worker: WorkerProbe
) -> None:
    assert omni_engine.defaults.supports_partial_images
    assert isinstance(worker.pipeline, StepPreviews)
    # The class vllm-omni's registry holds (this package's, pipelines/qwen_image.py), with it.
    assert type(worker.pipeline).__mro__[2] is ImageTaskQwenImagePipeline
    assert worker.pipeline.vae.use_slicing  # built by the registry, its set-up included


async def test_a_stream_gets_the_diffusers_engines_previews_then_its_unstreamed_image(
    omni_engine: OmniEngine, tiny_runner: DiffusersRunner
) -> None:
    outputs = await outputs_of(omni_engine, 5, partial_images=2)
    kinds = [type(output) for output in outputs]
    assert kinds == [ImagesStarted, PreviewImages, PreviewImages, FinalImages]
    [[first], [second]] = previews_in(outputs)
    [image] = final_in(outputs)
    # Two different steps, neither the last: more apart than two runs of one image.
    assert difference(first, second) > SAME_IMAGE
    assert difference(second, image) > SAME_IMAGE
    [plain] = final_in(await outputs_of(omni_engine, 5))
    assert difference(image, plain) <= SAME_IMAGE
    # The diffusers engine decodes its previews after the same steps (`preview_steps`).
    expected: list[Image.Image] = []
    [[theirs]] = tiny_runner.run(
        [req(5, num_inference_steps=STEPS, partial_images=2)],
        on_preview=lambda _position, _index, images: expected.extend(images),
    )
    assert most_different([first, second], expected) <= SAME_IMAGE
    assert difference(image, theirs) <= SAME_IMAGE


@pytest.mark.parametrize("masked", [False, True], ids=["image-to-image", "inpainting"])
async def test_a_streamed_edit_gets_the_diffusers_engines_previews_of_its_steps(
    omni_engine: OmniEngine, tiny_runner: DiffusersRunner, masked: bool
) -> None:
    """An edit runs the last steps x strength of the schedule (this package's pipeline in
    vllm-omni's step mode, which streaming output runs): its previews come after the same of
    those steps as the diffusers engine's, and it ends with its unstreamed image, the diffusers
    engine's (with a mask, the kept half as sent)."""
    source = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    edit = {"image": source, "strength": 0.8, "num_inference_steps": 5}
    if masked:
        edit["mask"] = mask
    outputs = [o async for o in omni_engine.generate(req(6, partial_images=2, **edit))]
    assert [type(o) for o in outputs] == [ImagesStarted, PreviewImages, PreviewImages, FinalImages]
    [plain] = final_in([o async for o in omni_engine.generate(req(6, **edit))])
    assert difference(final_in(outputs)[0], plain) <= SAME_IMAGE
    expected: list[Image.Image] = []
    [[theirs]] = tiny_runner.run(
        [req(6, partial_images=2, **edit)],
        on_preview=lambda _position, _index, images: expected.extend(images),
    )
    assert most_different([image for [image] in previews_in(outputs)], expected) <= SAME_IMAGE
    assert difference(plain, theirs) <= SAME_IMAGE
    if masked:
        kept = np.asarray(plain, dtype=int)[:, 32:] - np.asarray(source, dtype=int)[:, 32:]
        assert np.abs(kept).max() == 0


async def test_batched_streams_each_get_their_own_previews(
    omni_engine: OmniEngine, worker: WorkerProbe
) -> None:
    """Two streamed requests denoise in one step batch (the second joins the first at a step);
    each gets its own number of previews, the same as alone, for each of its images."""
    worker.hold.clear()
    one = asyncio.create_task(outputs_of(omni_engine, 1, partial_images=3))
    await until(worker.denoising.is_set, "the first to denoise", timeout_s=ENGINE_WAIT_S)
    two = asyncio.create_task(outputs_of(omni_engine, 2, 3, partial_images=1))
    await until(
        lambda: omni_engine.diffusion_engine.scheduler.num_waiting_requests() == 2,
        "the second's two images to wait in vllm-omni",
        timeout_s=ENGINE_WAIT_S,
    )
    worker.hold.set()
    together = await asyncio.gather(one, two)
    assert max(wave.running for wave in worker.waves) == 3  # all three images in one step
    alone = [await outputs_of(omni_engine, 1, partial_images=3)]
    alone.append(await outputs_of(omni_engine, 2, 3, partial_images=1))
    for batched, solo in zip(together, alone, strict=True):
        batched_previews, solo_previews = previews_in(batched), previews_in(solo)
        assert len(batched_previews) == len(solo_previews)
        for got, want in zip(batched_previews, solo_previews, strict=True):
            assert most_different(got, want) <= SAME_IMAGE
        assert most_different(final_in(batched), final_in(solo)) <= SAME_IMAGE
    assert [len(previews_in(outputs)) for outputs in together] == [3, 1]
    assert [len(images) for images in previews_in(together[1])] == [2]


async def test_a_request_whose_preparation_fails_in_a_step_batch_fails_alone(
    omni_engine: OmniEngine, worker: WorkerProbe, caplog: pytest.LogCaptureFixture
) -> None:
    """Step mode prepares each request apart: a lone surrogate in a negative prompt fails its
    request only, where it joins a running one; the failed one is not retried (nothing else
    failed with it), and it does not wait for the survivor to finish."""
    worker.hold.clear()
    good = asyncio.create_task(
        images_of(omni_engine.generate(req(1, num_inference_steps=STEPS, negative_prompt="ok")))
    )
    await until(worker.denoising.is_set, "the first to denoise", timeout_s=ENGINE_WAIT_S)
    bad = asyncio.create_task(
        images_of(omni_engine.generate(req(2, num_inference_steps=STEPS, negative_prompt="\ud800")))
    )
    await until_waiting_in_vllm_omni(omni_engine, 1)
    with caplog.at_level(logging.WARNING, logger="vllm_omni_images.engine"):
        worker.hold.set()
        with pytest.raises(EngineError, match="TextEncodeInput"):
            await bad
        assert len(await good) == 1
    assert max(wave.running for wave in worker.waves) == 2  # it joined the running step batch
    assert not any("alone" in record.getMessage() for record in caplog.records)


async def test_the_api_streams_partial_images_then_the_unstreamed_image(
    omni_engine: OmniEngine, make_app: AppFactory
) -> None:
    app = await make_app(omni_engine, ["--image-engine", "omni", "--diffusion-streaming-output"])
    seeded = {"num_inference_steps": STEPS, "seed": 21}
    async with sdk_client(app) as sdk:
        events, plain = await stream_and_plain(sdk, seeded)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [getattr(event, "partial_image_index", None) for event in events[:2]] == [0, 1]
    assert plain.data is not None and plain.data[0].b64_json is not None
    final = pixels(events[-1].b64_json).astype(int)
    assert abs(final - pixels(plain.data[0].b64_json).astype(int)).max() <= SAME_IMAGE
