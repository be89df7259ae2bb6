"""Faults in the vllm-omni engine's waves (docs/architecture.md, "Faults"), on vllm-omni's real
worker and Qwen-Image pipeline on CPU: a wave that runs out of memory is retried in halves,
down to single images; a wave that fails otherwise is retried request by request, so that only
the request that causes the failure fails.

`WorkerProbe.fits` models the device's memory: a wave it refuses raises `torch.OutOfMemoryError`
inside the real pipeline. A negative prompt with a lone surrogate makes the real tokenizer
raise for the whole wave. One engine is shared by the module, with `--image-max-batch-size 4`
and a batch delay (vllm-omni's admission wait), so that images handed over together form one
wave; a blocker holds the worker while the requests of a test queue behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
from vllm_omni.diffusion.request import OmniDiffusionRequest

from tests.support.batching import RecordingObserver
from tests.support.engines import req
from tests.support.omni import (
    SAME_IMAGE,
    WorkerProbe,
    admitted,
    build_engine,
    difference,
    images_from,
    start_blocker,
    until_vllm_omni_is_empty,
    until_waiting_in_vllm_omni,
)
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.errors import EngineError
from vllm_omni_images.engine.omni_engine import OmniEngine
from vllm_omni_images.images.errors import error_kind

from .conftest import AppFactory
from .helpers import FAST, assert_openai_error, generate, http_client, metric_value, pixels

HUGE = "an image that never fits"


@pytest.fixture(scope="module")
def observer() -> RecordingObserver:
    return RecordingObserver()


@pytest.fixture(scope="module")
def omni_engine(tiny_model_dir: Path, observer: RecordingObserver) -> Iterator[OmniEngine]:
    engine = build_engine(tiny_model_dir, batch_delay_ms=100, observer=observer)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture
def worker(probe: WorkerProbe, observer: RecordingObserver) -> Iterator[WorkerProbe]:
    probe.reset()
    observer.events.clear()
    yield probe
    probe.reset()


@pytest.fixture
def client(omni_engine: OmniEngine) -> ImageEngineClient:
    return admitted(omni_engine)


def memory_for(images: int) -> Callable[[list[OmniDiffusionRequest]], bool]:
    """A `WorkerProbe.fits`: a wave of at most `images` images fits, unless one of them has the
    prompt `HUGE` (it never fits, even alone)."""

    def fits(wave: list[OmniDiffusionRequest]) -> bool:
        return len(wave) <= images and all(r.prompt["prompt"] != HUGE for r in wave)

    return fits


def seeds_of(worker: WorkerProbe) -> list[list[int]]:
    """The seeds of each wave the worker ran, in order."""
    return [[r.sampling_params.seed for r in batch] for batch in worker.batches]


async def test_a_wave_out_of_memory_is_retried_in_halves_down_to_single_images(
    client: ImageEngineClient,
    worker: WorkerProbe,
    observer: RecordingObserver,
    omni_engine: OmniEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alone = {seed: (await images_from(client, req(seed)))[0] for seed in (1, 2, 3, 4)}
    worker.waves.clear()
    observer.events.clear()
    requests = [req(1), req(2, 3), req(4)]  # the second request's images are split apart
    blocker = await start_blocker(client, worker)
    waiting = [asyncio.create_task(images_from(client, r)) for r in requests]
    await until_waiting_in_vllm_omni(omni_engine, 4)
    worker.fits = memory_for(1)
    with caplog.at_level(logging.WARNING, logger="vllm_omni_images.engine"):
        worker.hold.set()
        _, *results = await asyncio.gather(blocker, *waiting)
    for request, images in zip(requests, results, strict=True):
        assert len(images) == request.num_images
        for seed, image in zip(request.seeds, images, strict=True):
            assert difference(image, alone[seed]) <= SAME_IMAGE
    # 4 -> 2 + 2 -> 1 + 1 + 1 + 1; each half queues again behind what was already waiting.
    assert seeds_of(worker) == [[1000], [1, 2, 3, 4], [1, 2], [3, 4], [1], [2], [3], [4]]
    assert observer.of("split") == [4, 2, 2]
    assert sorted(observer.of("start")) == [1, 1, 1, 2]  # once a request, however many tries
    assert any("retrying 2 + 2 images" in record.getMessage() for record in caplog.records)
    assert client.queued_images == client.running_images == 0
    await until_vllm_omni_is_empty(omni_engine)


def outcomes(text: str) -> dict[str, float]:
    """How many requests each outcome counted so far, from a /metrics answer."""
    return {
        outcome: metric_value(text, "vllm:image_requests_total", outcome=outcome)
        for outcome in ("ok", "out_of_memory", "error", "unavailable")
    }


async def test_an_image_that_never_fits_fails_only_its_request(
    make_app: AppFactory, omni_engine: OmniEngine, worker: WorkerProbe
) -> None:
    async with http_client(await make_app(omni_engine)) as http:
        before = outcomes((await http.get("/metrics")).text)
        worker.hold.clear()
        blocker = asyncio.create_task(generate(http, **FAST, seed=1000))
        await until(worker.denoising.is_set, "the blocker to start", timeout_s=ENGINE_WAIT_S)
        bodies: list[dict[str, object]] = [
            {"seed": 1},
            {"seed": 2, "n": 2, "prompt": HUGE},
            {"seed": 4},
        ]
        responses = [asyncio.create_task(generate(http, **FAST, **body)) for body in bodies]
        await until_waiting_in_vllm_omni(omni_engine, 4)
        worker.fits = memory_for(4)  # the wave fits but for its huge images
        worker.hold.set()
        blocked, first, huge, last = await asyncio.gather(blocker, *responses)
        for response in (blocked, first, last):
            assert response.status_code == 200, response.text
            assert pixels(response.json()["data"][0]["b64_json"]).shape == (64, 64, 3)
        error = assert_openai_error(huge, 503)
        assert error["type"] == "ServiceUnavailableError"
        assert "64x64 image did not fit, even alone" in error["message"]
        after = outcomes((await http.get("/metrics")).text)
        assert (await http.get("/health")).status_code == 200
    grew = {outcome: after[outcome] - before[outcome] for outcome in after}
    assert grew == {"ok": 3, "out_of_memory": 1, "error": 0, "unavailable": 0}
    # 4 -> [1, 2] + [3, 4], each with a huge image -> 1 alone, 2 alone (fails: its request
    # fails and its image 3 is withdrawn, unless vllm-omni started it already), 4 alone.
    waves = seeds_of(worker)
    assert waves[:6] == [[1000], [1, 2, 3, 4], [1, 2], [3, 4], [1], [2]]
    assert waves[6:] in ([[4]], [[3], [4]])
    await until_vllm_omni_is_empty(omni_engine)


async def test_a_request_withdrawn_while_its_retry_waits_is_not_retried(
    client: ImageEngineClient, worker: WorkerProbe, omni_engine: OmniEngine
) -> None:
    blocker = await start_blocker(client, worker)
    kept = asyncio.create_task(images_from(client, req(1)))
    gone = asyncio.create_task(images_from(client, req(2)))
    await until_waiting_in_vllm_omni(omni_engine, 2)

    def fits(wave: list[OmniDiffusionRequest]) -> bool:
        if len(wave) == 1:
            return True
        worker.hold.clear()  # the retries wait: the first at the worker, the second in vllm-omni
        return False

    worker.fits = fits
    worker.hold.set()
    await blocker
    await until(
        lambda: len(worker.batches) == 3 and worker.denoising.is_set(),
        "the first retry to run",
        timeout_s=ENGINE_WAIT_S,
    )
    await until_waiting_in_vllm_omni(omni_engine, 1)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    worker.hold.set()
    assert len(await kept) == 1
    await until_vllm_omni_is_empty(omni_engine)
    assert seeds_of(worker) == [[1000], [1, 2], [1]]
    assert client.queued_images == client.running_images == 0


async def test_a_request_that_breaks_the_pipeline_fails_alone_and_its_wave_runs_again(
    client: ImageEngineClient,
    worker: WorkerProbe,
    observer: RecordingObserver,
    omni_engine: OmniEngine,
) -> None:
    """A lone surrogate in a negative prompt makes the real tokenizer raise for the wave (the
    API refuses it; the engine must not rely on that): each request runs again alone."""
    good, two = req(1, negative_prompt="blurry"), req(3, 4, negative_prompt="dark")
    bad = req(2, negative_prompt="\ud800")
    alone = [await images_from(client, request) for request in (good, two)]
    worker.waves.clear()
    observer.events.clear()
    blocker = await start_blocker(client, worker)
    waiting = [asyncio.create_task(images_from(client, r)) for r in (good, bad, two)]
    await until_waiting_in_vllm_omni(omni_engine, 4)
    worker.hold.set()
    _, *results = await asyncio.gather(blocker, *waiting, return_exceptions=True)
    failure = results[1]
    assert isinstance(failure, EngineError) and "TextEncodeInput" in str(failure)
    assert error_kind(failure).status == HTTPStatus.INTERNAL_SERVER_ERROR
    for images, expected in zip((results[0], results[2]), alone, strict=True):
        assert isinstance(images, list) and len(images) == len(expected)
        for image, alone_image in zip(images, expected, strict=True):
            assert difference(image, alone_image) <= SAME_IMAGE
    # The wave, then each request alone (its images together), the failing one once.
    assert seeds_of(worker) == [[1000], [1, 2, 3, 4], [1], [2], [3, 4]]
    assert observer.of("isolated") == [3]
    assert client.queued_images == client.running_images == 0
    await until_vllm_omni_is_empty(omni_engine)


async def test_a_fault_of_the_wave_alone_fails_none_of_its_requests_through_the_api(
    make_app: AppFactory,
    omni_engine: OmniEngine,
    worker: WorkerProbe,
    observer: RecordingObserver,
) -> None:
    """A fault that strikes any wave of several requests, none alone (a batching bug): every
    request gets its images, each counted once (`ok`)."""

    def several_requests_fail(wave: list[OmniDiffusionRequest]) -> BaseException | None:
        return RuntimeError("a batched kernel failed") if len(wave) > 1 else None

    async with http_client(await make_app(omni_engine)) as http:
        before = outcomes((await http.get("/metrics")).text)
        worker.hold.clear()
        blocker = asyncio.create_task(generate(http, **FAST, seed=1000))
        await until(worker.denoising.is_set, "the blocker to start", timeout_s=ENGINE_WAIT_S)
        responses = [asyncio.create_task(generate(http, **FAST, seed=seed)) for seed in (1, 2)]
        await until_waiting_in_vllm_omni(omni_engine, 2)
        worker.fault = several_requests_fail
        worker.hold.set()
        for response in await asyncio.gather(blocker, *responses):
            assert response.status_code == 200, response.text
        after = outcomes((await http.get("/metrics")).text)
    grew = {outcome: after[outcome] - before[outcome] for outcome in after}
    assert grew == {"ok": 3, "out_of_memory": 0, "error": 0, "unavailable": 0}
    assert observer.of("isolated") == [2]
    assert seeds_of(worker) == [[1000], [1, 2], [1], [2]]
    await until_vllm_omni_is_empty(omni_engine)
