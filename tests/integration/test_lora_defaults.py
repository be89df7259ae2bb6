"""Per-adapter defaults through the HTTP API, on the diffusers engine of the tiny model:
`--image-lora-defaults` at start-up, `defaults` in `/v1/load_lora_adapter`'s body, the
adapters' cards in `/v1/models`, and what a request that names the adapter gets.

One adapter file is served twice, as `fast` (with defaults) and as `plain` (without), so that
"the image `fast` gives" can be compared with "the image of the same weights at those steps"."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.omni import SAME_IMAGE
from vllm_omni_images.engine.base import LoRASettings
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.tiny_model import TINY_MODEL_DEFAULTS

from .conftest import AppFactory
from .helpers import assert_openai_error, generate, http_client, pixels

BASE = "tiny-qwen-image"
MODEL_STEPS = TINY_MODEL_DEFAULTS["num_inference_steps"]  # 4
FAST_STEPS = 6  # the adapter's: `quality: medium` halves them to 3 (the model's 4 to 2)
SMALL = {"size": "64x64", "seed": 11}  # no steps: the defaults decide them


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> Iterator[DiffusersRunner]:
    """A runner of its own (adapters change its model): two adapters loaded at once, four
    kept read."""
    runner = DiffusersRunner(
        str(tiny_model_dir), device="cpu", lora=LoRASettings(max_loras=2, max_cpu_loras=4)
    )
    yield runner
    runner.close()


def served(loras: dict[str, Path], defaults: dict[str, dict[str, int]]) -> list[str]:
    """`fast` and `plain` (one file: `style`'s) and `other`, with `defaults`."""
    modules = [f"fast={loras['style']}", f"plain={loras['style']}", f"other={loras['other']}"]
    return [
        *("--enable-lora", "--max-loras", "2", "--lora-modules", *modules),
        *("--image-lora-defaults", json.dumps(defaults)),
    ]


@pytest.fixture
async def client(
    make_app: AppFactory,
    runner: DiffusersRunner,
    tiny_loras: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[httpx.AsyncClient]:
    """`fast` defaults to 6 steps, `other` to 3; runtime loading allowed."""
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    defaults = {"fast": {"num_inference_steps": FAST_STEPS}, "other": {"num_inference_steps": 3}}
    flags = served(tiny_loras, defaults)
    async with http_client(await make_app(runner, flags)) as http:
        yield http


async def image(client: httpx.AsyncClient, **body: object) -> np.ndarray:
    response = await generate(client, **{**SMALL, **body})
    assert response.status_code == 200, response.text
    return pixels(response.json()["data"][0]["b64_json"]).astype(int)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a - b).max()) <= SAME_IMAGE


async def cards(client: httpx.AsyncClient) -> dict[str, dict]:
    return {card["id"]: card for card in (await client.get("/v1/models")).json()["data"]}


async def test_a_request_naming_the_adapter_gets_its_steps_unless_it_sets_its_own(
    client: httpx.AsyncClient,
) -> None:
    plain_at_model_steps = await image(client, model="plain")
    plain_at_fast_steps = await image(client, model="plain", num_inference_steps=FAST_STEPS)
    assert not same(plain_at_model_steps, plain_at_fast_steps)
    assert same(await image(client, model="fast"), plain_at_fast_steps)
    # In the `lora` list as well as in `model`.
    assert same(await image(client, lora={"name": "fast"}), plain_at_fast_steps)
    # The request's own steps win.
    own = await image(client, model="fast", num_inference_steps=MODEL_STEPS)
    assert same(own, plain_at_model_steps)


async def test_quality_scales_the_adapters_steps(client: httpx.AsyncClient) -> None:
    """`medium` is half the default steps: the adapter's 6 -> 3, where the model's 4 -> 2."""
    medium = await image(client, model="fast", quality="medium")
    assert same(medium, await image(client, model="plain", num_inference_steps=FAST_STEPS // 2))
    assert not same(medium, await image(client, model="plain", quality="medium"))


async def test_two_adapters_that_default_a_knob_differently_need_the_request_to_set_it(
    client: httpx.AsyncClient,
) -> None:
    both = {"model": "fast", "lora": {"name": "other", "scale": 0.5}}
    error = assert_openai_error(await generate(client, **SMALL, **both), 400, "num_inference_steps")
    assert "different values (6 and 3)" in error["message"]
    assert (await generate(client, **SMALL, **both, num_inference_steps=2)).status_code == 200
    # One with defaults and one without: the one's.
    with_plain = await image(client, model="fast", lora={"name": "plain", "scale": 0.0})
    assert same(with_plain, await image(client, model="fast"))


async def test_models_shows_each_adapters_defaults(client: httpx.AsyncClient) -> None:
    listed = await cards(client)
    assert listed["fast"]["defaults"] == {"num_inference_steps": FAST_STEPS}
    assert listed["other"]["defaults"] == {"num_inference_steps": 3}
    assert "defaults" not in listed["plain"] and "defaults" not in listed[BASE]


async def test_a_load_sets_the_adapters_defaults_and_an_unload_drops_them(
    client: httpx.AsyncClient, tiny_loras: dict[str, Path]
) -> None:
    async def load(**body: object) -> httpx.Response:
        body = {"lora_name": "late", "lora_path": str(tiny_loras["style"]), **body}
        return await client.post("/v1/load_lora_adapter", json=body)

    steps = {"num_inference_steps": FAST_STEPS, "true_cfg_scale": 1.0}
    loaded = await load(defaults=steps)
    assert loaded.status_code == 200, loaded.text
    assert (await cards(client))["late"]["defaults"] == steps
    plain_at_fast_steps = await image(client, model="plain", num_inference_steps=FAST_STEPS)
    assert same(await image(client, model="late"), plain_at_fast_steps)
    # Loaded again in place without defaults: the model's again.
    assert (await load(load_inplace=True)).status_code == 200
    assert "defaults" not in (await cards(client))["late"]
    assert (await load(load_inplace=True, defaults=steps)).status_code == 200
    assert (await cards(client))["late"]["defaults"] == steps
    unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert unloaded.status_code == 200, unloaded.text
    assert (await load()).status_code == 200  # the same name anew: no defaults
    assert "defaults" not in (await cards(client))["late"]


@pytest.mark.parametrize(
    ("defaults", "param"),
    [
        ({"num_inference_steps": 0}, "defaults.num_inference_steps"),
        ({"num_inference_steps": "8"}, "defaults.num_inference_steps"),
        ({"guidance_scale": 21}, "defaults.guidance_scale"),
        ({"true_cfg": 1.0}, "defaults.true_cfg"),
        (8, "defaults"),
    ],
    ids=["steps-0", "steps-text", "guidance-21", "unknown-key", "not-an-object"],
)
async def test_bad_defaults_in_a_load_are_a_400_naming_them_and_nothing_is_loaded(
    client: httpx.AsyncClient, tiny_loras: dict[str, Path], defaults: object, param: str
) -> None:
    body = {"lora_name": "late", "lora_path": str(tiny_loras["style"]), "defaults": defaults}
    response = await client.post("/v1/load_lora_adapter", json=body)
    error = assert_openai_error(response, 400)
    assert error["param"] == param and error["message"].startswith(f"{param}: ")
    assert "late" not in await cards(client)


async def test_a_field_the_load_route_does_not_have_is_a_400_naming_it(
    client: httpx.AsyncClient, tiny_loras: dict[str, Path]
) -> None:
    body = {"lora_name": "late", "lora_path": str(tiny_loras["style"]), "lora_scale": 0.5}
    error = assert_openai_error(await client.post("/v1/load_lora_adapter", json=body), 400)
    assert error["param"] == "lora_scale" and "not a field" in error["message"]
    assert "late" not in await cards(client)
