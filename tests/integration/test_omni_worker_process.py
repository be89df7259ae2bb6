"""vllm-omni's worker processes (the `mp` executor) build this package's pipelines too: each
runs vllm-omni's general plugins itself, `image_task` among them (`pipelines/__init__.py`). One
worker process, one inpainting edit: about 30 s on 2 cores, the one `mp` engine `make test`
starts (test_omni_parallel_cpu.py's, with parallelism, run on request)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from PIL import Image
from vllm_omni.diffusion.executor.multiproc_executor import MultiprocDiffusionExecutor

from tests.support.engines import images_of
from tests.support.images import gradient_source, left_half_engine_mask
from tests.support.omni import SAME_IMAGE, build_engine, difference
from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

GENERATION_WAIT_S = 120.0


async def edit_in(engine_dir: Path, edit: EngineRequest) -> Image.Image:
    engine = build_engine(engine_dir, max_batch_size=1, distributed_executor_backend="mp")
    try:
        assert isinstance(engine.diffusion_engine.executor, MultiprocDiffusionExecutor)
        [image] = await asyncio.wait_for(images_of(engine.generate(edit)), GENERATION_WAIT_S)
        return image
    finally:
        await engine.close()


async def test_a_worker_process_registers_this_packages_pipeline_and_inpaints_alike(
    tiny_model_dir: Path, tiny_runner: DiffusersRunner
) -> None:
    """vllm-omni's worker process runs its general plugins itself (`image_task`), so it builds
    this package's Qwen-Image pipeline: an inpainting edit there is the diffusers engine's."""
    edit = EngineRequest(
        prompt="a red fox",
        width=64,
        height=64,
        num_inference_steps=4,
        seeds=(3,),
        image=gradient_source(),
        mask=left_half_engine_mask(),
        strength=0.7,
    )
    image = await edit_in(tiny_model_dir, edit)
    [[expected]] = await asyncio.to_thread(tiny_runner.run, [edit])
    assert difference(image, expected) <= SAME_IMAGE
