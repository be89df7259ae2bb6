"""Edit models on the vllm-omni engine: vllm-omni's real worker runs its own
QwenImageEditPipeline on the CPU, from a tiny Qwen-Image-Edit folder built locally
(`testing/tiny_edit_model.py`), under this project's admission and HTTP API; and `strength`,
honoured or refused by name.

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

from testing.tiny_edit_model import build_tiny_edit_model
from tests.support.batching import FLAG_DEFAULTS
from tests.support.engines import images_of, req
from tests.support.images import png
from tests.support.omni import SAME_IMAGE, WorkerProbe, build_engine, difference
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.errors import EngineRequestError
from vllm_omni_images.engine.omni_engine import OmniEngine

from .conftest import AppFactory
from .helpers import assert_openai_error, http_client

STEPS = 2


@pytest.fixture(scope="module")
def tiny_edit_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_edit_model(tmp_path_factory.mktemp("models") / "tiny-qwen-image-edit")


@pytest.fixture(scope="module")
def edit_engine(tiny_edit_model_dir: Path) -> Iterator[OmniEngine]:
    """vllm-omni's real worker serving its own QwenImageEditPipeline from the tiny folder."""
    engine = build_engine(tiny_edit_model_dir, max_batch_size=1)
    yield engine
    asyncio.run(engine.close())


def stripes() -> Image.Image:
    """An input with structure: horizontal stripes of two colours."""
    array = np.zeros((64, 64, 3), np.uint8)
    array[::8] = (240, 200, 40)
    array[array.sum(axis=2) == 0] = (30, 60, 150)
    return Image.fromarray(array)


async def test_an_edit_model_edits_in_vllm_omnis_own_pipeline(
    edit_engine: OmniEngine, tiny_edit_model_dir: Path
) -> None:
    """The image reaches vllm-omni's edit pipeline as its own edit endpoint passes it, and the
    edit is the one diffusers' QwenImageEditPipeline makes of the same folder, image and seed."""
    from diffusers import QwenImageEditPipeline

    worker = WorkerProbe(edit_engine)
    assert edit_engine.takes_images and not edit_engine.takes_strength
    client = ImageEngineClient(edit_engine, "tiny-edit", FLAG_DEFAULTS.admission_config())
    source = stripes()
    edit = req(3, image=source, prompt="make it red", num_inference_steps=STEPS)
    [image] = await images_of(client.generate(edit))
    [[sent]] = worker.batches
    assert sent.prompt["multi_modal_data"]["image"] is source
    pipe = QwenImageEditPipeline.from_pretrained(tiny_edit_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    [expected] = pipe(
        image=source,
        prompt="make it red",
        height=64,
        width=64,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images
    assert image.size == (64, 64)
    assert difference(image, expected) <= SAME_IMAGE
    with pytest.raises(EngineRequestError, match="QwenImageEditPipeline takes no mask"):
        await images_of(client.generate(req(3, image=source, mask=Image.new("L", (64, 64)))))


async def test_strength_is_refused_by_name_where_the_pipeline_never_reads_it(
    make_app: AppFactory, edit_engine: OmniEngine
) -> None:
    """vllm-omni's QwenImageEditPipeline never reads `strength`: a 400 naming it, before any
    work (the engine refuses it too, if asked directly)."""
    assert not edit_engine.defaults.supports_strength
    async with http_client(await make_app(edit_engine)) as http:
        files = {"image": ("in.png", png(stripes()), "image/png")}
        data = {"prompt": "make it red", "seed": "3", "num_inference_steps": str(STEPS)}
        refused = await http.post("/v1/images/edits", data={**data, "strength": "0.7"}, files=files)
    error = assert_openai_error(refused, 400, "strength")
    assert "strength is not supported by this model" in error["message"]
    with pytest.raises(EngineRequestError, match="strength"):  # the engine's own check
        await images_of(edit_engine.generate(req(3, image=stripes(), strength=0.7)))
