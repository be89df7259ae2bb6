"""The vllm-omni engine: vllm-omni's real `DiffusionEngine`, worker, model runner and Qwen-Image
pipeline on CPU (this package's CPU platform), under this project's admission and HTTP API.

One engine, built with `--image-max-batch-size 4`, is shared by the tests (building one takes
a few seconds once vllm-omni is imported); `WorkerProbe` (tests/support/omni.py) records its
waves and holds or breaks its pipeline at a denoising step. Only the test of a worker process
that dies uses a stand-in executor, since an in-process worker cannot die. Edits are in
`test_omni_edits.py` (Qwen-Image) and `test_omni_edit_models.py` (edit models), LoRA adapters in
`test_omni_lora.py`, since one in-process engine lives at a time in a test process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vllm_omni.diffusion.request import OmniDiffusionRequest
from vllm_omni.inputs.data import OmniDiffusionSamplingParams

from tests.support.batching import FLAG_DEFAULTS
from tests.support.engines import images_of, req
from tests.support.omni import (
    SAME_IMAGE,
    FakeDiffusionExecutor,
    WorkerProbe,
    admitted,
    batch_sizes,
    build_engine,
    difference,
    images_from,
    start_blocker,
    until_vllm_omni_is_empty,
    until_waiting_in_vllm_omni,
)
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.base import EngineRequest, ModelDefaults
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.errors import (
    EngineDiedError,
    EngineError,
    EngineOutOfMemoryError,
    EngineRequestError,
    RequestOverBudgetError,
    RequestTimeoutError,
)
from vllm_omni_images.engine.memory_budget import PixelGate
from vllm_omni_images.engine.model_folder import QWEN_IMAGE_ROPE_POSITIONS, QWEN_IMAGE_TEXT_TOKENS
from vllm_omni_images.engine.omni_engine import OmniEngine
from vllm_omni_images.engine.omni_requests import refuse_unsupported, to_omni_request
from vllm_omni_images.tiny_model import TINY_MODEL_BYTES_PER_MEGAPIXEL

from .conftest import AppFactory
from .helpers import FAST, assert_openai_error, generate, http_client, pixels


@pytest.fixture(scope="module")
def omni_engine(tiny_model_dir: Path) -> Iterator[OmniEngine]:
    engine = build_engine(tiny_model_dir)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture
def client(omni_engine: OmniEngine) -> ImageEngineClient:
    return admitted(omni_engine)


# The mapping


def test_each_image_is_one_vllm_omni_request_with_its_own_seed() -> None:
    request = EngineRequest(
        prompt="a red fox",
        seeds=(7, 8),
        width=96,
        height=64,
        num_inference_steps=3,
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        guidance_scale=2.5,
    )
    first, second = (to_omni_request(request, i, f"a-{i}") for i in range(2))
    assert isinstance(first, OmniDiffusionRequest)
    assert (first.request_id, second.request_id) == ("a-0", "a-1")
    assert first.prompt == {"prompt": "a red fox", "negative_prompt": "blurry"}
    sampling = first.sampling_params
    assert isinstance(sampling, OmniDiffusionSamplingParams)
    assert (sampling.width, sampling.height, sampling.num_inference_steps) == (96, 64, 3)
    assert (sampling.true_cfg_scale, sampling.guidance_scale) == (4.0, 2.5)
    assert sampling.guidance_scale_provided  # vllm-omni's pipelines honour it only when set
    assert (sampling.seed, second.sampling_params.seed) == (7, 8)
    assert sampling.num_outputs_per_prompt == 1 and sampling.generator_device == "cpu"


def test_unset_knobs_are_left_to_the_pipeline() -> None:
    only = to_omni_request(req(1), 0, "a-0")
    assert only.prompt == {"prompt": "a red fox"}
    assert only.batch_compatibility_key is None  # vllm-omni's default: batched with any
    assert only.sampling_params.true_cfg_scale is None
    assert not only.sampling_params.guidance_scale_provided


def test_defaults_come_from_the_served_pipeline(omni_engine: OmniEngine) -> None:
    assert omni_engine.model_class_name == "QwenImagePipeline"  # read from model_index.json
    # The tiny model's vllm_omni_images.json sets its size and steps; the size multiple is
    # Qwen-Image's own (VAE factor 8 x 2x2 patches), and so is the minimum of 2 steps (its
    # scheduler's terminal shift, read from the folder's scheduler_config.json); this
    # package's Qwen-Image pipeline (pipelines/qwen_image.py) honours strength. Its longest
    # side is its RoPE table's, read from the folder's transformer config as diffusers' is.
    # Its bytes per megapixel are measured (benchmarks/memory_admission.py).
    defaults = ModelDefaults(width=256, height=256, num_inference_steps=4, size_multiple=16)
    assert omni_engine.defaults == dataclasses.replace(
        defaults,
        max_side=98_304,
        min_steps=2,
        bytes_per_megapixel=TINY_MODEL_BYTES_PER_MEGAPIXEL,
    )
    assert omni_engine.takes_strength


def test_vllm_omnis_qwen_image_rope_positions_exactly_the_longest_side() -> None:
    """vllm-omni's own Qwen-Image RoPE (its transformer's copy of diffusers'): a side of
    `max_side` pixels and the longest prompt get all their positions; two patches more do not."""
    from vllm_omni.diffusion.models.qwen_image.qwen_image_transformer import QwenEmbedRope

    rope = QwenEmbedRope(theta=10000, axes_dim=[2, 2, 4], scale_rope=True)
    assert rope.pos_freqs.shape[0] == QWEN_IMAGE_ROPE_POSITIONS
    patches = 98_304 // 16
    for width, fits in ((patches, True), (patches + 2, False)):
        image, text = rope([(1, 1, width)], [QWEN_IMAGE_TEXT_TOKENS], torch.device("cpu"))
        assert image.shape[0] == width
        assert (text.shape[0] == QWEN_IMAGE_TEXT_TOKENS) is fits


async def test_the_worker_gets_the_request_as_mapped(
    client: ImageEngineClient, worker: WorkerProbe
) -> None:
    request = req(5, 6, prompt="a blue boat", negative_prompt="fog", true_cfg_scale=3.0)
    images = await images_from(client, request)
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    ran = [r for batch in worker.batches for r in batch]
    assert sorted(r.sampling_params.seed for r in ran) == [5, 6]
    assert all(r.prompt == {"prompt": "a blue boat", "negative_prompt": "fog"} for r in ran)
    assert all(r.sampling_params.true_cfg_scale == 3.0 for r in ran)


async def test_requests_with_the_same_client_id_stay_apart(
    client: ImageEngineClient, worker: WorkerProbe
) -> None:
    same_id = [req(seed, request_id="img-twice") for seed in (1, 2)]
    first, second = await asyncio.gather(*(images_from(client, r) for r in same_id))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    ids = [r.request_id for batch in worker.batches for r in batch]
    assert len(set(ids)) == 2 and all(i.startswith("img-twice-") for i in ids)


def test_a_pipeline_refuses_the_inputs_it_does_not_take() -> None:
    edit = req(1, image=Image.new("RGB", (64, 64)))
    inpaint = req(1, image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 64)))
    strong = req(1, image=Image.new("RGB", (64, 64)), strength=0.5)
    defaults = ModelDefaults(width=64, height=64, num_inference_steps=4, size_multiple=16)

    def refuse(
        request: EngineRequest, name: str, images: bool, masks: bool = False, strength: bool = False
    ) -> None:
        refuse_unsupported(
            request,
            name,
            takes_images=images,
            takes_masks=masks,
            takes_strength=strength,
            defaults=defaults,
        )

    with pytest.raises(EngineRequestError, match="FluxPipeline takes no input image"):
        refuse(edit, "FluxPipeline", images=False)
    refuse(edit, "QwenImageEditPipeline", images=True)
    with pytest.raises(EngineRequestError, match="QwenImageEditPipeline takes no mask"):
        refuse(inpaint, "QwenImageEditPipeline", images=True)
    with pytest.raises(EngineRequestError, match="strength is not supported by Qwen"):
        refuse(strong, "QwenImageEditPipeline", images=True)
    refuse(inpaint, "QwenImagePipeline", images=True, masks=True)
    refuse(strong, "QwenImagePipeline", images=True, strength=True)


async def test_previews_need_streaming_output(
    omni_engine: OmniEngine, make_app: AppFactory
) -> None:
    """This engine runs in request mode (test_omni_previews.py serves them)."""
    with pytest.raises(EngineRequestError, match="--diffusion-streaming-output"):
        await images_of(omni_engine.generate(req(1, partial_images=1)))
    async with http_client(await make_app(omni_engine)) as http:
        response = await generate(http, stream=True, partial_images=1, **FAST)
    error = assert_openai_error(response, 400, "partial_images")
    assert "--diffusion-streaming-output" in error["message"]


# vllm-omni's own pipeline makes the images


async def test_the_same_image_as_the_diffusers_engine(
    client: ImageEngineClient, worker: WorkerProbe, tiny_runner: DiffusersRunner
) -> None:
    request = req(7, negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=3)
    [omni] = await images_from(client, request)
    [[diffusers]] = await asyncio.to_thread(tiny_runner.run, [request])
    assert omni.size == diffusers.size == (64, 64)
    assert difference(omni, diffusers) <= SAME_IMAGE
    assert len(worker.batches) == 1  # made by vllm-omni's worker, not elsewhere


async def test_the_negative_prompt_changes_the_image(client: ImageEngineClient) -> None:
    guided = {"true_cfg_scale": 4.0, "num_inference_steps": 3}
    [plain] = await images_from(client, req(7, **guided))
    [negative] = await images_from(client, req(7, negative_prompt="blurry", **guided))
    [other] = await images_from(client, req(7, negative_prompt="a green boat", **guided))
    assert difference(plain, negative) > 10 * SAME_IMAGE
    assert difference(negative, other) > 10 * SAME_IMAGE


async def test_an_image_depends_on_its_seed_alone(
    client: ImageEngineClient, worker: WorkerProbe
) -> None:
    one, two = await images_from(client, req(1, 2))
    assert difference(one, two) > 10 * SAME_IMAGE
    [alone] = await images_from(client, req(2))
    worker.waves.clear()
    batched = await asyncio.gather(images_from(client, req(9)), images_from(client, req(2)))
    assert batch_sizes(worker) == [1, 1] or batch_sizes(worker) == [2]
    assert difference(alone, two) <= SAME_IMAGE
    assert difference(batched[1][0], two) <= SAME_IMAGE


# Batching: vllm-omni's scheduler is the only batcher


async def test_five_compatible_requests_run_as_four_and_one(
    client: ImageEngineClient, worker: WorkerProbe, omni_engine: OmniEngine
) -> None:
    blocker = await start_blocker(client, worker)
    waiting = [asyncio.create_task(images_from(client, req(seed))) for seed in range(5)]
    await until_waiting_in_vllm_omni(omni_engine, 5)
    worker.hold.set()
    results = await asyncio.gather(blocker, *waiting)
    assert all(len(images) == 1 for images in results)
    assert batch_sizes(worker) == [1, 4, 1]
    assert client.queued_images == client.running_images == 0


async def test_incompatible_requests_run_apart(
    client: ImageEngineClient, worker: WorkerProbe, omni_engine: OmniEngine
) -> None:
    blocker = await start_blocker(client, worker)
    sizes = [64, 64, 96, 96, 64]
    waiting = [
        asyncio.create_task(images_from(client, req(i, width=w))) for i, w in enumerate(sizes)
    ]
    await until_waiting_in_vllm_omni(omni_engine, 5)
    worker.hold.set()
    await asyncio.gather(blocker, *waiting)
    widths = [[r.sampling_params.width for r in batch] for batch in worker.batches[1:]]
    # vllm-omni batches runs of compatible requests in arrival order; it never reorders.
    assert widths == [[64, 64], [96, 96], [64]]


# The pixel budget: requests wait their turn before vllm-omni


@pytest.fixture
def room_for_two(omni_engine: OmniEngine) -> Iterator[PixelGate]:
    """The shared engine with a pixel budget of two of `req`'s 64x64 images, for one test (as
    `--image-max-pixels-in-flight 2x64x64` builds it); its own gate, to look at."""
    budget = 2 * 64 * 64
    saved = omni_engine.max_pixels_in_flight, omni_engine._gate
    gate = PixelGate(budget)
    omni_engine.max_pixels_in_flight, omni_engine._gate = budget, gate
    yield gate
    omni_engine.max_pixels_in_flight, omni_engine._gate = saved


async def test_requests_over_the_pixel_budget_wait_before_vllm_omni(
    client: ImageEngineClient,
    worker: WorkerProbe,
    omni_engine: OmniEngine,
    room_for_two: PixelGate,
) -> None:
    blocker = await start_blocker(client, worker)
    waiting = [asyncio.create_task(images_from(client, req(seed))) for seed in range(3)]
    await until_waiting_in_vllm_omni(omni_engine, 1)  # one more fits beside the blocker
    await until(lambda: room_for_two.waiting == 2, "two requests held back")
    assert client.queued_images == 3  # admitted, all three; queued, two of them here
    waiting[2].cancel()  # a request held back leaves without reaching vllm-omni
    await asyncio.gather(waiting[2], return_exceptions=True)
    await until(lambda: room_for_two.waiting == 1, "the cancelled request to leave")
    worker.hold.set()
    results = await asyncio.gather(blocker, *waiting[:2])
    assert [len(images) for images in results] == [1, 1, 1]
    assert max(batch_sizes(worker)) <= 2
    assert sorted(r.sampling_params.seed for b in worker.batches for r in b) == [0, 1, 1000]
    assert room_for_two.in_flight == 0 and client.queued_images == client.running_images == 0
    ran = len(worker.batches)
    with pytest.raises(RequestOverBudgetError, match="What fits: n=2 at 64x64"):
        await images_from(client, req(1, 2, 3))  # refused by admission, before any work
    assert len(worker.batches) == ran and room_for_two.in_flight == 0


# Cancellation and timeouts abort the request in vllm-omni


async def test_cancel_while_queued_frees_its_place_at_once(
    client: ImageEngineClient, worker: WorkerProbe, omni_engine: OmniEngine
) -> None:
    blocker = await start_blocker(client, worker)
    queued = asyncio.create_task(images_from(client, req(7)))
    await until_waiting_in_vllm_omni(omni_engine, 1)
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert client.queued_images == 0
    worker.hold.set()
    assert len(await blocker) == 1
    await until_vllm_omni_is_empty(omni_engine)
    assert [r.sampling_params.seed for batch in worker.batches for r in batch] == [1000]


async def test_a_request_aborted_before_it_reaches_vllm_omni_never_runs(
    client: ImageEngineClient, worker: WorkerProbe
) -> None:
    blocker = await start_blocker(client, worker)
    for seed in range(20):  # the abort races the hand-over to vllm-omni's loop every time
        early = asyncio.create_task(images_from(client, req(seed)))
        await asyncio.sleep(0)  # handed over, not yet in vllm-omni
        early.cancel()
        await asyncio.gather(early, return_exceptions=True)
    worker.hold.set()
    await blocker
    assert [r.sampling_params.seed for batch in worker.batches for r in batch] == [1000]
    assert len(await images_from(client, req(3))) == 1


async def test_requests_aborted_on_their_way_to_an_idle_engine_leave_nothing_behind(
    client: ImageEngineClient, omni_engine: OmniEngine
) -> None:
    """The abort races vllm-omni's admission on an idle engine: before it (stopped at the
    door), during or after it (aborted there). Each way, the request ends, nothing stays
    queued or running in admission or in vllm-omni, and the next request is served."""
    for seed in range(20):
        early = asyncio.create_task(images_from(client, req(seed)))
        for _ in range(seed % 4):  # a little further on its way each time
            await asyncio.sleep(0)
        early.cancel()
        await asyncio.gather(early, return_exceptions=True)
    await until_vllm_omni_is_empty(omni_engine)
    assert client.queued_images == client.running_images == 0
    assert len(await images_from(client, req(3))) == 1


async def test_cancel_while_running_drops_the_result_and_serves_the_next(
    client: ImageEngineClient, worker: WorkerProbe, omni_engine: OmniEngine
) -> None:
    running = await start_blocker(client, worker)
    await until(lambda: client.running_images == 1, "a running image")
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)  # withdrawn: abort called
    assert client.running_images == 0  # answered: no longer counted
    worker.hold.set()
    await until_vllm_omni_is_empty(omni_engine)
    assert len(await images_from(client, req(3))) == 1
    assert client.running_images == 0


async def test_a_timeout_aborts_the_request(omni_engine: OmniEngine, worker: WorkerProbe) -> None:
    config = dataclasses.replace(FLAG_DEFAULTS.admission_config(), request_timeout_s=0.3)
    client = ImageEngineClient(omni_engine, "tiny-qwen-image", config)
    worker.hold.clear()
    with pytest.raises(RequestTimeoutError):
        await images_from(client, req(4))
    assert client.queued_images == client.running_images == 0
    worker.hold.set()
    await until_vllm_omni_is_empty(omni_engine)


# Faults


async def test_an_engine_error_fails_its_request_and_the_next_is_served(
    client: ImageEngineClient, worker: WorkerProbe
) -> None:
    worker.fail_with = RuntimeError("the pipeline broke")
    with pytest.raises(EngineError, match="the pipeline broke"):
        await images_from(client, req(1))
    worker.fail_with = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    with pytest.raises(EngineOutOfMemoryError, match="64x64 image did not fit, even alone"):
        await images_from(client, req(1))  # alone in its wave: not retried
    assert len(await images_from(client, req(1))) == 1


async def test_errors_reach_the_client_as_openai_errors(
    make_app: AppFactory, omni_engine: OmniEngine, worker: WorkerProbe
) -> None:
    async with http_client(await make_app(omni_engine)) as http:
        worker.fail_with = RuntimeError("the pipeline broke")
        error = assert_openai_error(await generate(http, **FAST), 500)
        assert "the pipeline broke" in error["message"]
        worker.fail_with = torch.OutOfMemoryError("CUDA out of memory")
        assert_openai_error(await generate(http, **FAST), 503)
        response = await generate(http, n=2, **FAST)
        assert response.status_code == 200, response.text
        first, second = (pixels(item["b64_json"]) for item in response.json()["data"])
        assert first.shape == (64, 64, 3) and not np.array_equal(first, second)


async def test_a_dead_worker_turns_health_and_requests_into_503(
    make_app: AppFactory, tiny_model_dir: Path
) -> None:
    """A worker process that dies (the stand-in executor: an in-process worker cannot)."""
    engine = build_engine(
        tiny_model_dir, max_batch_size=1, distributed_executor_backend=FakeDiffusionExecutor
    )
    worker = engine.diffusion_engine.executor
    assert isinstance(worker, FakeDiffusionExecutor)
    worker.batches.clear()  # vllm-omni's start-up warm-up
    try:
        async with http_client(await make_app(engine)) as http:
            assert (await http.get("/health")).status_code == 200
            worker.script.hold.clear()
            in_flight = asyncio.create_task(generate(http, **FAST))
            await until(worker.running.is_set, "the worker to start", timeout_s=ENGINE_WAIT_S)
            worker.die()
            assert_openai_error(await in_flight, 503)
            assert (await http.get("/health")).status_code == 503
            error = assert_openai_error(await generate(http, **FAST), 503)
            assert "engine is dead" in error["message"]
            assert len(worker.batches) == 1  # refused before reaching vllm-omni
            with pytest.raises(EngineDiedError):
                engine.check_health()
    finally:
        await engine.close()
