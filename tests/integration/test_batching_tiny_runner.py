"""Batching through the batching engine gives the same images as running each request alone."""

from __future__ import annotations

import asyncio

import numpy as np

from tests.support.engines import ObservedRunner, images_of
from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.batching import BatchingConfig, BatchingEngine
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner


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
        difference = np.abs(
            np.asarray(image, dtype=np.int16) - np.asarray(alone, dtype=np.int16)
        ).max()
        print(f"seed {request.seeds[0]}: max pixel difference batched vs alone = {difference}")
        assert difference <= 1
