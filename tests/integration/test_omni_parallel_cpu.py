"""vllm-omni's parallelism on CPU: two worker processes (the `mp` executor, gloo between them)
make the same image as one.

Ulysses sequence parallelism splits each attention's heads across the workers (an all-to-all
before and after it); CFG parallelism runs the positive branch on one worker and the negative
one on the other, then gathers both. Neither changes the arithmetic of any one head or branch,
so the image is the single worker's (measured: identical, bit for bit).

Each engine starts two worker processes, and each imports vllm-omni anew: 3-4 minutes an engine
on 2 busy CPU cores (the module took 9 minutes), too long for `make test`, so this module runs
only when asked:

    VLLM_OMNI_IMAGES_PARALLEL_TESTS=1 .venv/bin/pytest tests/integration/test_omni_parallel_cpu.py

(The `mp` executor with one worker process is checked here too; `make test` drives the
in-process `uni` executor.) The reference comes from the in-process (`uni`) worker, closed before
the parallel engines start (it holds process-wide parallel state).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from vllm_omni.diffusion.executor.multiproc_executor import MultiprocDiffusionExecutor

from tests.support.engines import images_of
from tests.support.omni import SAME_IMAGE, build_engine, difference
from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.omni_engine import OmniEngine

pytestmark = pytest.mark.skipif(
    os.environ.get("VLLM_OMNI_IMAGES_PARALLEL_TESTS") != "1",
    reason="3-4 minutes an engine: set VLLM_OMNI_IMAGES_PARALLEL_TESTS=1 to run",
)

GENERATION_WAIT_S = 120.0

PARALLEL = {
    "one-worker-process": ({"distributed_executor_backend": "mp"}, 1),
    "ulysses": ({"ulysses_degree": 2}, 2),
    "cfg": ({"cfg_parallel_size": 2}, 2),
}
"""Engine options, and the worker processes they start."""


def fox(negative_prompt: str | None = "blurry") -> EngineRequest:
    """A request with a negative branch (true CFG), which CFG parallelism needs."""
    return EngineRequest(
        prompt="a red fox",
        negative_prompt=negative_prompt,
        width=128,
        height=128,
        num_inference_steps=4,
        true_cfg_scale=4.0,
        seeds=(7,),
    )


async def generate(engine: OmniEngine, request: EngineRequest) -> Image.Image:
    [image] = await asyncio.wait_for(images_of(engine.generate(request)), GENERATION_WAIT_S)
    return image


@pytest.fixture(scope="module")
def single_worker_image(tiny_model_dir: Path) -> Image.Image:
    async def images() -> tuple[Image.Image, Image.Image]:
        engine = build_engine(tiny_model_dir, max_batch_size=1)
        try:
            return await generate(engine, fox()), await generate(engine, fox(negative_prompt=None))
        finally:
            await engine.close()

    image, without_negative = asyncio.run(images())
    # The negative branch counts, so CFG parallelism has a second branch to run.
    assert difference(image, without_negative) > SAME_IMAGE
    return image


@pytest.mark.parametrize(("options", "workers"), PARALLEL.values(), ids=PARALLEL.keys())
async def test_worker_processes_make_the_in_process_workers_image(
    tiny_model_dir: Path,
    single_worker_image: Image.Image,
    options: dict[str, Any],
    workers: int,
) -> None:
    engine = build_engine(tiny_model_dir, max_batch_size=1, **options)
    try:
        executor = engine.diffusion_engine.executor
        assert isinstance(executor, MultiprocDiffusionExecutor)
        assert executor.od_config.parallel_config.world_size == workers
        assert difference(await generate(engine, fox()), single_worker_image) <= SAME_IMAGE
    finally:
        await engine.close()
