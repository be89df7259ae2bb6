"""Batching through the batching engine gives the same images as running each request alone,
also for the requests of a batch that one request made fail."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import numpy as np
from PIL import Image

from tests.support.batching import RecordingObserver
from tests.support.engines import ObservedRunner, images_of
from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.batching import BatchingConfig, BatchingEngine
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.errors import EngineError
from vllm_omni_images.images.errors import error_kind


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


async def test_batched_images_match_images_generated_alone(tiny_runner: DiffusersRunner) -> None:
    requests = [
        EngineRequest(prompt=prompt, seeds=(seed,), width=64, height=64, num_inference_steps=2)
        for prompt, seed in [
            ("a red fox", 1),
            ("a lighthouse at dusk in heavy rain", 22),
            ("", 333),
        ]
    ]
    runner = ObservedRunner(tiny_runner)
    # The delay only lets all three arrive before the first batch forms.
    engine = BatchingEngine(
        runner, BatchingConfig(max_batch_size=4, batch_delay_ms=200, hang_grace_s=60.0)
    )
    try:
        batched = await asyncio.gather(*(images_of(engine.generate(r)) for r in requests))
    finally:
        await engine.close()
    assert runner.batches == [3]

    for request, [image] in zip(requests, batched, strict=True):
        [[alone]] = await asyncio.to_thread(tiny_runner.run, [request])
        assert image.size == alone.size == (64, 64)
        difference = max_difference(image, alone)
        print(f"seed {request.seeds[0]}: max pixel difference batched vs alone = {difference}")
        assert difference <= 1


async def test_a_request_that_breaks_the_pipeline_fails_alone(tiny_runner: DiffusersRunner) -> None:
    """A lone surrogate in a negative prompt makes the real tokenizer raise `TypeError` for
    the whole call (the API refuses it; the engine must not rely on that): the batch runs again
    request by request, and only that request fails."""

    def request(seeds: tuple[int, ...], negative_prompt: str) -> EngineRequest:
        return EngineRequest(
            prompt="a red fox",
            seeds=seeds,
            width=64,
            height=64,
            num_inference_steps=2,
            negative_prompt=negative_prompt,
        )

    good, bad, two = request((1,), "blurry"), request((2,), "\ud800"), request((3, 4), "dark")
    runner = ObservedRunner(tiny_runner)
    observer = RecordingObserver()
    engine = BatchingEngine(
        runner,
        BatchingConfig(max_batch_size=4, batch_delay_ms=200, hang_grace_s=60.0),
        observer=observer,
    )
    try:
        results = await asyncio.gather(
            *(images_of(engine.generate(r)) for r in (good, bad, two)), return_exceptions=True
        )
    finally:
        await engine.close()
    failure = results[1]
    assert isinstance(failure, EngineError) and "TextEncodeInput" in str(failure)
    assert error_kind(failure).status == HTTPStatus.INTERNAL_SERVER_ERROR  # its own 500
    assert runner.batches == [4, 1, 1, 2]  # the batch, then each request alone, once
    assert observer.of("isolated") == [3]
    for kept, images in ((good, results[0]), (two, results[2])):
        assert isinstance(images, list)
        alone = (await asyncio.to_thread(tiny_runner.run, [kept]))[0]
        assert len(images) == len(alone) == kept.num_images
        for image, expected in zip(images, alone, strict=True):
            assert max_difference(image, expected) <= 1
