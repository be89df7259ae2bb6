"""`POST /v1/images/generations` and the core routes, in-process, on the real tiny model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from vllm.v1.metrics.prometheus import get_prometheus_registry

from tests.support.engines import FailingRunner
from tests.support.images import FAST_STEPS
from tests.support.waiting import ENGINE_WAIT_S, until
from vllm_omni_images.images.encoding import decode_image_base64

from .helpers import FAST, assert_openai_error, generate, http_client, pixels


async def test_one_image_at_the_model_default_size(client):
    response = await generate(client, **FAST_STEPS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "256x256"
    assert body["output_format"] == "png"
    assert isinstance(body["created"], int)
    [item] = body["data"]
    image = decode_image_base64(item["b64_json"])
    assert image.format == "PNG"
    assert image.size == (256, 256)


async def test_requested_size_is_width_by_height(client):
    response = await generate(client, size="128x64", **FAST_STEPS)
    assert response.status_code == 200, response.text
    assert decode_image_base64(response.json()["data"][0]["b64_json"]).size == (128, 64)


async def test_n_images_are_all_different(client):
    response = await generate(client, n=3, seed=7, **FAST)
    assert response.status_code == 200, response.text
    images = [pixels(item["b64_json"]) for item in response.json()["data"]]
    assert len(images) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(images[i], images[j])


async def test_same_seed_gives_byte_identical_images(client):
    first = await generate(client, seed=1234, n=2, **FAST)
    second = await generate(client, seed=1234, n=2, **FAST)
    assert first.status_code == second.status_code == 200
    assert [d["b64_json"] for d in first.json()["data"]] == [
        d["b64_json"] for d in second.json()["data"]
    ]


async def test_without_seed_images_differ(client):
    first = await generate(client, **FAST)
    second = await generate(client, **FAST)
    assert not np.array_equal(
        pixels(first.json()["data"][0]["b64_json"]), pixels(second.json()["data"][0]["b64_json"])
    )


async def test_seed_flag_makes_a_run_of_seedless_requests_repeat_after_a_restart(
    make_app, tiny_runner
):
    """As vLLM's `--seed` (default 0) seeds its sampling: the same server restarted draws the
    same seeds, each request its own; another `--seed` draws others."""

    async def run(seed: str) -> list[str]:
        async with http_client(await make_app(tiny_runner, ["--seed", seed])) as client:
            return [(await generate(client, **FAST)).json()["data"][0]["b64_json"] for _ in "ab"]

    first, restarted, other = await run("7"), await run("7"), await run("8")
    assert first == restarted
    assert first[0] != first[1] and set(first).isdisjoint(other)


async def test_negative_prompt_changes_the_image(client):
    plain = await generate(client, seed=5, **FAST)
    negative = await generate(client, seed=5, negative_prompt="blurry, dark", **FAST)
    assert plain.status_code == negative.status_code == 200
    assert not np.array_equal(
        pixels(plain.json()["data"][0]["b64_json"]), pixels(negative.json()["data"][0]["b64_json"])
    )


async def test_jpeg_output_format(client):
    response = await generate(client, output_format="jpeg", output_compression=80, **FAST)
    assert response.status_code == 200, response.text
    assert response.json()["output_format"] == "jpeg"
    assert decode_image_base64(response.json()["data"][0]["b64_json"]).format == "JPEG"


async def test_served_model_name_is_accepted(client):
    response = await generate(client, model="tiny-qwen-image", **FAST)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 201}, "num_inference_steps"),
        ({"guidance_scale": 21}, "guidance_scale"),
        ({"true_cfg_scale": -1}, "true_cfg_scale"),
        ({"seed": 2**63}, "seed"),
        ({"size": "big"}, "size"),
        ({"response_format": "gif"}, "response_format"),
        ({"size": "250x250"}, "size"),
        ({"size": "8192x8192"}, "size"),
        ({"background": "transparent"}, "background"),
        ({"style": "vivid"}, "style"),
        ({"moderation": "auto"}, "moderation"),
        ({"stream": True, "n": 2}, "n"),
        ({"output_format": "svg"}, "output_format"),
        ({"temperature": 0.5}, "temperature"),  # not a field of this API at all
    ],
)
async def test_invalid_input_is_a_400_naming_the_field(client, body, param):
    response = await client.post("/v1/images/generations", json={"prompt": "a fox", **body})
    error = assert_openai_error(response, 400, param)
    if body.get("size") == "250x250":
        assert "multiples of 16" in error["message"]


async def test_one_step_is_refused_for_a_model_that_needs_two(client):
    response = await generate(client, size="64x64", num_inference_steps=1)
    error = assert_openai_error(response, 400, "num_inference_steps")
    assert "at least 2" in error["message"]
    low = await generate(client, size="64x64", quality="low")  # 25 % of 4 steps: 2, not 1
    assert pixels(low.json()["data"][0]["b64_json"]).std() > 10


async def test_missing_prompt_is_a_400(client):
    response = await client.post("/v1/images/generations", json={"n": 1})
    assert_openai_error(response, 400, "prompt")


async def test_body_must_be_json(client):
    response = await client.post(
        "/v1/images/generations", content="prompt=a fox", headers={"content-type": "text/plain"}
    )
    assert_openai_error(response, 400)
    broken = await client.post(
        "/v1/images/generations", content="{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(broken, 400)


async def test_unknown_model_is_vllms_404(client):
    response = await generate(client, model="dall-e-3", **FAST)
    error = assert_openai_error(response, 404, "model")
    assert error["type"] == "NotFoundError"
    assert "dall-e-3" in error["message"]
    assert response.json() == {
        "error": {
            "message": "The model `dall-e-3` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


async def test_core_routes(client):
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/version")).json()["version"]
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert "# TYPE" in metrics.text
    models = (await client.get("/v1/models")).json()
    [card] = models["data"]
    assert card["id"] == "tiny-qwen-image"
    assert card["object"] == "model"
    assert card["owned_by"] == "vllm"
    assert card["max_model_len"] is None


@pytest.mark.parametrize(
    "path", ["/tokenize", "/detokenize", "/invocations", "/v1/chat/completions"]
)
async def test_text_only_routes_answer_a_clear_404(client, path):
    response = await client.post(path, json={"prompt": "hi"})
    error = assert_openai_error(response, 404)
    assert error["type"] == "NotFoundError"
    assert "/v1/images/generations" in error["message"]
    assert response.json() == {
        "error": {
            "message": f"{path} is not available: this server serves the image model "
            "`tiny-qwen-image` (vllm serve --task image). Use POST /v1/images/generations.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
    }


async def test_served_model_name_flag(make_app, tiny_runner):
    app = await make_app(tiny_runner, ["--served-model-name", "my-images"])
    async with http_client(app) as client:
        assert (await generate(client, model="my-images", **FAST)).status_code == 200
        assert_openai_error(await generate(client, model="tiny-qwen-image", **FAST), 404)
        models = (await client.get("/v1/models")).json()
        assert [card["id"] for card in models["data"]] == ["my-images"]


async def test_api_key_is_required_when_set(make_app, tiny_runner):
    app = await make_app(tiny_runner, ["--api-key", "secret"])
    async with http_client(app) as client:
        denied = await generate(client, **FAST)
        assert denied.status_code == 401
        assert denied.json() == {"error": "Unauthorized"}
        wrong = await client.post(
            "/v1/images/generations",
            json={"prompt": "fox", **FAST},
            headers={"Authorization": "Bearer wrong"},
        )
        assert wrong.status_code == 401
        allowed = await client.post(
            "/v1/images/generations",
            json={"prompt": "fox", **FAST},
            headers={"Authorization": "Bearer secret"},
        )
        assert allowed.status_code == 200, allowed.text


async def test_model_not_loaded_is_a_503(make_app, tiny_runner):
    app = await make_app(tiny_runner)
    await app.state.engine_client.close()  # as at the end of a shutdown: the model is released
    async with http_client(app) as client:
        assert (await client.get("/health")).status_code == 503
        error = assert_openai_error(await generate(client, **FAST), 503)
        assert "not loaded" in error["message"]


@pytest.mark.parametrize(
    ("prompt", "status", "fragment"),
    [("oom", 503, "out of GPU memory"), ("fail", 500, "NaNs"), ("bug", 500, "unexpected")],
)
async def test_engine_errors_fail_one_request_and_the_server_keeps_serving(
    make_app, tiny_runner, prompt, status, fragment
):
    async with http_client(await make_app(FailingRunner(tiny_runner))) as client:
        failed = await client.post("/v1/images/generations", json={"prompt": prompt, **FAST})
        error = assert_openai_error(failed, status)
        assert fragment in error["message"]
        assert (await client.get("/health")).status_code == 200
        assert (await generate(client, **FAST)).status_code == 200


def denoising_steps_run() -> float:
    """Denoising steps the engines of this process have run (`/metrics`' step histogram)."""
    registry = get_prometheus_registry()
    labels = {"model_name": "tiny-qwen-image"}
    return registry.get_sample_value("vllm:image_denoise_step_seconds_count", labels) or 0.0


async def test_health_answers_while_an_image_is_generated(client):
    steps_before = denoising_steps_run()
    generation = asyncio.create_task(generate(client, size="512x512", num_inference_steps=8))
    await until(
        lambda: denoising_steps_run() > steps_before,
        "the request's first denoising step on the engine thread",
        timeout_s=ENGINE_WAIT_S,
    )
    health = await client.get("/health")
    assert health.status_code == 200
    assert not generation.done(), "the health check waited for the generation"
    assert (await generation).status_code == 200
