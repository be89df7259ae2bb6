"""`stream: true` with `partial_images`, through the official `openai` SDK, in-process on the
real tiny engine: OpenAI's event types, real previews, and the same final image as unstreamed."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.support.engines import DelegatingRunner
from tests.support.images import FAST
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

from .conftest import AppFactory
from .helpers import assert_openai_error, http_client, pixels, sdk_client, stream_and_plain

SEEDED = {"num_inference_steps": 4, "seed": 21}


async def test_a_stream_sends_its_partial_images_then_the_unstreamed_image(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, _ = served
    events, plain = await stream_and_plain(sdk, SEEDED)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [getattr(event, "partial_image_index", None) for event in events[:2]] == [0, 1]
    assert all(event.size == "64x64" and event.output_format == "png" for event in events)
    previews = [pixels(event.b64_json) for event in events[:2]]
    final = pixels(events[-1].b64_json)
    assert not np.array_equal(previews[0], previews[1])  # two different steps
    assert not np.array_equal(previews[1], final)
    assert plain.data is not None and plain.data[0].b64_json == events[-1].b64_json


async def test_an_edit_streams_image_edit_events(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, _ = served
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 60, 150)).save(buffer, format="PNG")
    stream = await sdk.images.edit(
        model="tiny-qwen-image",
        image=("in.png", buffer.getvalue(), "image/png"),
        prompt="a red fox",
        stream=True,
        partial_images=1,
        extra_body={**SEEDED, "strength": 1.0},
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    plain = await sdk.images.edit(
        model="tiny-qwen-image",
        image=("in.png", buffer.getvalue(), "image/png"),
        prompt="a red fox",
        extra_body={**SEEDED, "strength": 1.0},
    )
    assert plain.data is not None and plain.data[0].b64_json == events[-1].b64_json


async def test_a_stream_without_partial_images_sends_only_the_result(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, _ = served
    stream = await sdk.images.generate(
        model="tiny-qwen-image", prompt="a fox", size="64x64", stream=True, extra_body=SEEDED
    )
    assert [event.type async for event in stream] == ["image_generation.completed"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": True, "n": 2}, "n"),
        ({"stream": True, "response_format": "url"}, "response_format"),
        ({"partial_images": 2}, "partial_images"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
    ],
)
async def test_streams_that_cannot_be_served_are_400s_before_streaming(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient], body: dict, param: str
) -> None:
    _, http = served
    response = await http.post(
        "/v1/images/generations", json={"prompt": "a fox", "size": "64x64", **body}
    )
    assert_openai_error(response, 400, param)


async def test_a_failure_mid_stream_is_an_error_event_the_sdk_raises(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    from tests.support.engines import FailingRunner

    app = await make_app(FailingRunner(tiny_runner))
    async with sdk_client(app) as sdk:
        stream = await sdk.images.generate(
            model="tiny-qwen-image", prompt="fail", size="64x64", stream=True, extra_body=SEEDED
        )
        with pytest.raises(openai.APIError, match="Image generation failed"):
            async for _ in stream:
                pass


async def test_a_full_queue_refuses_a_stream_with_a_plain_429(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    from tests.support.engines import ObservedRunner
    from tests.support.waiting import ENGINE_WAIT_S, until

    engine = ObservedRunner(tiny_runner)
    app = await make_app(engine, ["--image-max-queue", "1"])
    engine_client = app.state.engine_client
    body = {"prompt": "a fox", **FAST}
    async with http_client(app) as http:
        engine.gate.clear()
        running = asyncio.create_task(http.post("/v1/images/generations", json=body))
        await until(engine.started.is_set, "the first request to run", timeout_s=ENGINE_WAIT_S)
        waiting = asyncio.create_task(http.post("/v1/images/generations", json=body))
        await until(
            lambda: (engine_client.running_images, engine_client.queued_images) == (1, 1),
            "one running and a full queue",
        )
        refused = await http.post(
            "/v1/images/generations", json={**body, "stream": True, "partial_images": 1}
        )
        engine.gate.set()
        assert_openai_error(refused, 429)
        assert refused.headers["content-type"].startswith("application/json")
        assert "retry-after" in refused.headers
        assert [(await task).status_code for task in (running, waiting)] == [200, 200]


async def test_a_slow_stream_gets_vllms_keep_alive_comments_and_the_sdk_reads_on(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> None:
    """`--sse-keep-alive-interval`, as vLLM's chat stream: while no event comes, a comment
    line keeps proxies from closing the connection; clients skip it."""

    class SlowRunner(DelegatingRunner):
        def run(self, requests, on_step=None, on_preview=None):
            time.sleep(1.5)  # the engine thread, before the call: no event for a while
            return super().run(requests, on_step, on_preview)

    app = await make_app(SlowRunner(tiny_runner), ["--sse-keep-alive-interval", "1"])
    body = {"prompt": "a fox", "stream": True, **FAST}
    async with http_client(app) as http:
        response = await http.post("/v1/images/generations", json=body)
        lines = response.text.splitlines()
    assert any(line.startswith(":") for line in lines)  # the keep-alive comment
    assert any("image_generation.completed" in line for line in lines)
    async with sdk_client(app) as sdk:
        stream = await sdk.images.generate(
            model="tiny-qwen-image", prompt="a fox", size="64x64", stream=True, extra_body=SEEDED
        )
        assert [event.type async for event in stream] == ["image_generation.completed"]
