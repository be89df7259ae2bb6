"""The vllm-omni engine's life on CPU: built from `vllm serve` flags, step-level batching, and
shutdown, each test with an engine of its own on vllm-omni's real worker.

vllm-omni's in-process (`uni`) worker sets up process-wide parallel state, so one such engine
lives at a time in a test process: each test here closes its engine before the next builds
one, and this module runs apart from `test_omni_engine.py`'s shared engine.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from PIL import Image

from tests.support.batching import FLAG_DEFAULTS, RecordingObserver
from tests.support.engines import hung_error, images_of, req
from tests.support.omni import (
    SAME_IMAGE,
    WorkerProbe,
    batch_sizes,
    build_engine,
    difference,
    until_waiting_in_vllm_omni,
)
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.errors import EngineClosedError, EngineNotReadyError
from vllm_omni_images.engine.omni_engine import OmniEngine

from .conftest import AppFactory
from .helpers import FAST, assert_openai_error, generate, http_client


async def test_vllm_serve_flags_to_http_five_requests_run_as_four_and_one(
    make_app: AppFactory, serve_parser
) -> None:
    """The whole path of `vllm serve tiny-qwen-image --task image --image-engine omni
    --image-max-batch-size 4`, in-process: flags, engine choice (vllm-omni on this package's
    CPU platform), vllm-omni's engine and real worker, HTTP."""
    from vllm_omni_images.server.launcher import load_engine

    flags = ["--image-engine", "omni", "--image-max-batch-size", "4"]
    args = serve_parser.parse_args(["tiny-qwen-image", "--task", "image", *flags])
    args.model = args.model_tag
    engine = load_engine(args)
    assert isinstance(engine, OmniEngine)
    worker = WorkerProbe(engine)
    try:
        app = await make_app(engine, flags)
        engine_client = app.state.engine_client
        async with http_client(app) as http:
            worker.hold.clear()
            blocker = asyncio.create_task(generate(http, seed=100, **FAST))
            await until(worker.denoising.is_set, "the worker to start", timeout_s=ENGINE_WAIT_S)
            await until(lambda: engine_client.running_images == 1, "admission to see it start")
            five = [asyncio.create_task(generate(http, seed=seed, **FAST)) for seed in range(5)]
            await until_waiting_in_vllm_omni(engine, 5)
            worker.hold.set()
            responses = await asyncio.gather(blocker, *five)
        assert [response.status_code for response in responses] == [200] * 6
        assert batch_sizes(worker) == [1, 4, 1]
    finally:
        await engine.close()


async def test_shutdown_fails_the_waiting_and_lets_the_running_finish(tiny_model_dir: Path) -> None:
    engine = build_engine(tiny_model_dir, max_batch_size=1)
    worker = WorkerProbe(engine)
    client = ImageEngineClient(engine, "tiny-qwen-image", FLAG_DEFAULTS.admission_config())
    worker.hold.clear()
    running = asyncio.create_task(images_of(client.generate(req(1))))
    await until(worker.denoising.is_set, "the worker to start", timeout_s=ENGINE_WAIT_S)
    waiting = asyncio.create_task(images_of(client.generate(req(2))))
    await until(
        lambda: (client.running_images, client.queued_images) == (1, 1),
        "one running and one waiting image",
        timeout_s=ENGINE_WAIT_S,
    )
    closing = asyncio.create_task(client.close())
    with pytest.raises(EngineClosedError):
        await waiting
    assert not closing.done()  # the running request is not cut off
    worker.hold.set()
    [image] = await running
    assert isinstance(image, Image.Image)
    await asyncio.wait_for(closing, ENGINE_WAIT_S)
    assert not client.is_running
    with pytest.raises(EngineNotReadyError):  # vllm-omni's engine is closed
        engine.check_admission(1)


async def test_shutdown_waits_for_a_stuck_request_no_longer_than_the_hang_grace(
    tiny_model_dir: Path,
) -> None:
    engine = build_engine(tiny_model_dir, max_batch_size=1, hang_grace_s=0.5)
    worker = WorkerProbe(engine)
    client = ImageEngineClient(engine, "tiny-qwen-image", FLAG_DEFAULTS.admission_config())
    worker.hold.clear()
    running = asyncio.create_task(images_of(client.generate(req(1))))
    await until(worker.denoising.is_set, "the worker to start", timeout_s=ENGINE_WAIT_S)
    # Closing vllm-omni's engine waits for its worker thread, which the probe holds: let it go
    # a while after the hang grace, from a thread (the event loop waits on that close).
    threading.Timer(1.5, worker.hold.set).start()
    closing = asyncio.create_task(client.close())
    with pytest.raises(EngineClosedError):
        await asyncio.wait_for(running, ENGINE_WAIT_S)
    await asyncio.wait_for(closing, ENGINE_WAIT_S)
    assert not client.is_running


async def test_a_stuck_worker_is_taken_as_hung_until_it_returns(
    make_app: AppFactory, tiny_model_dir: Path
) -> None:
    """A live worker that does not return: once its aborted request has not left vllm-omni
    `--image-engine-hang-grace` seconds later, /health answers 503 and requests 503 at once;
    when the worker returns, the server serves again."""
    engine = build_engine(tiny_model_dir, max_batch_size=1, hang_grace_s=0.5)
    worker = WorkerProbe(engine)
    try:
        app = await make_app(engine, ["--image-request-timeout", "0.5"])
        async with http_client(app) as http:
            worker.hold.clear()
            assert_openai_error(await generate(http, **FAST), 504)
            await until(lambda: hung_error(engine) is not None, "the engine to be taken as hung")
            assert (await http.get("/health")).status_code == 503
            error = assert_openai_error(await generate(http, **FAST), 503)
            assert "not responding" in error["message"]
            worker.hold.set()
            await until(
                lambda: hung_error(engine) is None,
                "the engine to serve again",
                timeout_s=ENGINE_WAIT_S,
            )
            assert (await http.get("/health")).status_code == 200
            assert (await generate(http, **FAST)).status_code == 200
    finally:
        await engine.close()


# vllm-omni's step-level batching (--step-execution)


async def test_a_request_joins_a_running_batch_at_a_step_boundary(tiny_model_dir: Path) -> None:
    engine = build_engine(tiny_model_dir, step_execution=True)
    worker = WorkerProbe(engine)
    observer = RecordingObserver()
    client = ImageEngineClient(
        engine, "tiny-qwen-image", FLAG_DEFAULTS.admission_config(), observer=observer
    )
    try:
        worker.hold.clear()
        first = asyncio.create_task(images_of(client.generate(req(1, num_inference_steps=6))))
        await until(worker.denoising.is_set, "the first to denoise", timeout_s=ENGINE_WAIT_S)
        worker.hold.set()
        await until(lambda: len(worker.waves) >= 3, "a few steps", timeout_s=ENGINE_WAIT_S)
        second = asyncio.create_task(images_of(client.generate(req(2, num_inference_steps=6))))
        [one], [two] = await asyncio.gather(first, second)
        joined = next(i for i, wave in enumerate(worker.waves) if wave.new and i > 0)
        assert worker.waves[joined].running == 2  # it ran beside the first, mid-denoise
        assert 0 < joined < 6
        # What `vllm:image_running_images` shows: both while both run, the second alone
        # after the first ends (not 0), then none.
        assert observer.of("running") == [1, 2, 1, 0]
        # vLLM's load gauges, (waiting, running) requests: the second waits, then runs
        # beside the first.
        assert observer.of("requests") == [(1, 0), (0, 1), (1, 1), (0, 2), (0, 1), (0, 0)]
        [alone] = await images_of(client.generate(req(2, num_inference_steps=6)))
        assert difference(two, alone) <= SAME_IMAGE
        assert difference(one, two) > 10 * SAME_IMAGE
    finally:
        await client.close()
