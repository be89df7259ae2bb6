"""After a burst of requests, some of whose clients leave mid-request, the server holds nothing
more than before: no asyncio task, no thread, no queued or running image. (The soak benchmark
measures memory and descriptors of a real `vllm serve` over thousands of requests; tasks can
only be counted in-process, here.)

The app is served by uvicorn on a real socket in this event loop, so a client that leaves
closes its connection and the app hears `http.disconnect`, as under `vllm serve`. (An in-process
ASGI transport would instead cancel the app's coroutine, which no server does, and which leaves
vLLM's `listen_for_disconnect` tasks waiting forever.)"""

from __future__ import annotations

import asyncio
import random
import re
import threading

import httpx
import uvicorn

from testing.server_process import free_port
from tests.support.images import FAST
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

from .conftest import AppFactory
from .helpers import metric_value

REQUESTS = 48
CONCURRENCY = 12


POOL_THREADS = re.compile(r"AnyIO worker thread|asyncio_\d+|ThreadPoolExecutor-\d+_\d+")
"""Workers of bounded pools (anyio's, asyncio's default executor): they come and go with load
(anyio's leave after 10 s idle), so they are no leak."""


def own_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if not POOL_THREADS.fullmatch(t.name)}


async def burst(client: httpx.AsyncClient, seed: int) -> tuple[int, int]:
    """`REQUESTS` requests from `CONCURRENCY` clients; one in four leaves after a few ms.
    Returns (answered 200, left)."""
    rng = random.Random(seed)
    answered = left = 0
    queue = list(range(REQUESTS))

    async def worker() -> None:
        nonlocal answered, left
        while queue:
            index = queue.pop()
            body = {"prompt": f"leak {index}", **FAST, "n": 1 + index % 2, "seed": index}
            call = client.post("/v1/images/generations", json=body)
            if rng.random() < 0.25:
                try:
                    await asyncio.wait_for(call, timeout=rng.uniform(0.001, 0.05))
                except TimeoutError:
                    left += 1
                    continue
            else:
                response = await call
                assert response.status_code == 200, response.text
                answered += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return answered, left


async def test_a_burst_with_clients_that_leave_leaves_no_task_thread_or_image_behind(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    app = await make_app(tiny_runner, ["--image-max-batch-size", "4"])
    engine_client = app.state.engine_client
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started, "uvicorn", timeout_s=ENGINE_WAIT_S)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            await burst(client, seed=0)  # starts the engine's thread, the workers, connections
            await until(lambda: engine_client.running_images == 0, "idle", timeout_s=ENGINE_WAIT_S)
            tasks = {task.get_name() for task in asyncio.all_tasks()}
            threads = own_threads()

            answered, left = await burst(client, seed=1)
            await until(lambda: engine_client.running_images == 0, "idle", timeout_s=ENGINE_WAIT_S)
            await until(
                lambda: {task.get_name() for task in asyncio.all_tasks()} <= tasks,
                "the request tasks to end",
                timeout_s=ENGINE_WAIT_S,
            )
            metrics = (await client.get("/metrics")).text
    finally:
        server.should_exit = True
        await serving

    assert answered + left == REQUESTS and left > 0
    # The server heard them leave: their work was withdrawn, not finished for nobody.
    assert metric_value(metrics, "vllm:image_requests_total", outcome="cancelled") > 0
    assert engine_client.queued_images == 0
    assert own_threads() <= threads
