"""Batching through the scheduler gives the same images as generating each request alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from vllm_omni_images.engine.base import EngineRequest, ImageEngine
from vllm_omni_images.engine.scheduler import ImageScheduler, SchedulerConfig, SchedulerObserver


class BatchSizes(SchedulerObserver):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_batch_start(self, requests: Sequence[EngineRequest], queue_wait_s: list[float]) -> None:
        self.sizes.append(len(requests))


async def test_batched_images_match_images_generated_alone(tiny_engine: ImageEngine) -> None:
    requests = [
        EngineRequest(prompt=prompt, seeds=(seed,), width=64, height=64, num_inference_steps=2)
        for prompt, seed in [
            ("a red fox", 1),
            ("a lighthouse at dusk in heavy rain", 22),
            ("", 333),
        ]
    ]
    observer = BatchSizes()
    # The delay only lets all three arrive before the first batch forms.
    config = SchedulerConfig(max_batch_size=4, batch_delay_s=0.2)
    scheduler = ImageScheduler(tiny_engine, config, observer=observer)
    try:
        batched = await asyncio.gather(*(scheduler.submit(r) for r in requests))
    finally:
        await scheduler.close()
    assert observer.sizes == [3]

    for request, [image] in zip(requests, batched, strict=True):
        [[alone]] = await asyncio.to_thread(tiny_engine.generate, [request])
        assert image.size == alone.size == (64, 64)
        difference = np.abs(
            np.asarray(image, dtype=np.int16) - np.asarray(alone, dtype=np.int16)
        ).max()
        print(f"seed {request.seeds[0]}: max pixel difference batched vs alone = {difference}")
        assert difference <= 1
