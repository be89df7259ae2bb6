"""LoRA adapters served as model names, on the diffusers engine of the tiny model: vLLM's
`--enable-lora --lora-modules`, `/v1/models`, `model` and `lora_scale` in requests, and vLLM's
runtime load and unload routes. Real adapters (peft, diffusers' format, and the same weights in
the other layouts diffusers reads: testing/tiny_lora.py) on the real pipeline; the vllm-omni
engine's are in test_omni_lora.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from testing.tiny_lora import (
    LAYOUTS,
    UNSERVABLE,
    build_tiny_lora,
    tiny_lora_weights,
    write_foreign_lora,
    write_layout,
    write_sparse_lora,
    write_unservable,
)
from tests.support.omni import SAME_IMAGE
from tests.support.stacks import write_summed_lora
from vllm_omni_images.engine.base import LoRASettings
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.errors import EngineUnavailableError

from .conftest import AppFactory
from .helpers import FAST, assert_openai_error, generate, http_client, pixels, sdk_client

BASE = "tiny-qwen-image"


@pytest.fixture(scope="module")
def lora_runner(tiny_model_dir: Path) -> Iterator[DiffusersRunner]:
    """A runner of its own (adapters change its model): two adapters loaded at once, three
    kept read."""
    runner = DiffusersRunner(
        str(tiny_model_dir), device="cpu", lora=LoRASettings(max_loras=2, max_cpu_loras=3)
    )
    yield runner
    runner.close()


def lora_flags(loras: dict[str, Path], *names: str) -> list[str]:
    return ["--enable-lora", "--lora-modules", *(f"{n}={loras[n]}" for n in names)]


@pytest.fixture
async def lora_client(
    make_app: AppFactory, lora_runner: DiffusersRunner, tiny_loras: dict[str, Path]
) -> httpx.AsyncClient:
    app = await make_app(lora_runner, lora_flags(tiny_loras, "style", "other"))
    return http_client(app)


async def image(client: httpx.AsyncClient, **body: object) -> np.ndarray:
    response = await generate(client, **{**FAST, "seed": 11, **body})
    assert response.status_code == 200, response.text
    return pixels(response.json()["data"][0]["b64_json"]).astype(int)


def differ(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


async def test_models_lists_each_adapter_with_the_base_model_as_parent(
    make_app: AppFactory, lora_runner: DiffusersRunner, tiny_loras: dict[str, Path]
) -> None:
    app = await make_app(lora_runner, lora_flags(tiny_loras, "style", "other"))
    async with sdk_client(app) as sdk:
        cards = {card.id: card for card in (await sdk.models.list()).data}
    assert set(cards) == {BASE, "style", "other"}
    style, base = cards["style"].model_dump(), cards[BASE].model_dump()
    assert (style["parent"], style["root"]) == (BASE, str(tiny_loras["style"]))
    assert base.get("parent") is None


async def test_the_json_form_names_the_adapters_base_model(
    make_app: AppFactory, lora_runner: DiffusersRunner, tiny_loras: dict[str, Path]
) -> None:
    """vLLM's JSON form of --lora-modules: `base_model_name` is the parent /v1/models shows,
    among the names --served-model-name gives the base model."""
    module = {"name": "other", "path": str(tiny_loras["other"]), "base_model_name": "qwen"}
    flags = ["--served-model-name", BASE, "qwen", "--enable-lora"]
    app = await make_app(lora_runner, [*flags, "--lora-modules", json.dumps(module)])
    async with http_client(app) as client:
        cards = (await client.get("/v1/models")).json()["data"]
        assert [(c["id"], c.get("parent")) for c in cards] == [
            (BASE, None),
            ("qwen", None),
            ("other", "qwen"),
        ]
        assert differ(await image(client, model="other"), await image(client, model="qwen")) > 10


async def test_an_adapter_changes_the_image_and_the_base_model_stays_the_same(
    lora_client: httpx.AsyncClient,
) -> None:
    async with lora_client as client:
        before = await image(client)
        style, other = await image(client, model="style"), await image(client, model="other")
        during = await image(client, model=BASE)
        half = await image(client, model="style", lora_scale=0.5)
        off = await image(client, model="style", lora_scale=0.0)
        after = await image(client)
    assert differ(style, before) > 10 and differ(other, before) > 10 and differ(style, other) > 10
    assert differ(during, before) <= SAME_IMAGE and differ(after, before) <= SAME_IMAGE
    assert differ(off, before) <= SAME_IMAGE  # strength 0 is the base model
    assert differ(half, before) > 2 and differ(half, style) > 2


async def test_a_mix_of_base_and_adapters_gets_the_images_each_gets_alone(
    make_app: AppFactory, lora_runner: DiffusersRunner, tiny_loras: dict[str, Path]
) -> None:
    # Batches of up to 4: the mix queues up behind the first call and batches per adapter.
    flags = [*lora_flags(tiny_loras, "style", "other"), "--image-max-batch-size", "4"]
    async with http_client(await make_app(lora_runner, flags)) as client:
        models = [BASE, "style", "other", BASE, "style", "other", "style", BASE]
        alone = {m: await image(client, model=m) for m in set(models)}
        mixed = await asyncio.gather(*(image(client, model=m) for m in models))
    for model, result in zip(models, mixed, strict=True):
        assert differ(result, alone[model]) <= SAME_IMAGE, model


async def test_an_unknown_model_is_a_404_and_lora_scale_needs_an_adapter(
    lora_client: httpx.AsyncClient,
) -> None:
    async with lora_client as client:
        assert_openai_error(await generate(client, model="nope", **FAST), 404, "model")
        for model in (None, BASE):
            body = {"lora_scale": 0.5, **FAST} | ({"model": model} if model else {})
            error = assert_openai_error(await generate(client, **body), 400, "lora_scale")
            assert "adapter" in error["message"]
        too_strong = await generate(client, model="style", lora_scale=1000, **FAST)
        assert_openai_error(too_strong, 400, "lora_scale")


async def test_an_edit_uses_the_adapter_too(lora_client: httpx.AsyncClient) -> None:
    from tests.support.images import png

    async def edit(**fields: str) -> np.ndarray:
        response = await client.post(
            "/v1/images/edits",
            data={"prompt": "a red fox", "seed": "3", "num_inference_steps": "2", **fields},
            files={"image": ("in.png", png(), "image/png")},
        )
        assert response.status_code == 200, response.text
        return pixels(response.json()["data"][0]["b64_json"]).astype(int)

    async with lora_client as client:
        assert differ(await edit(model="style"), await edit()) > 10
        assert_openai_error(
            await client.post(
                "/v1/images/edits",
                data={"prompt": "p", "lora_scale": "0.5"},
                files={"image": ("in.png", png(), "image/png")},
            ),
            400,
            "lora_scale",
        )


# Start-up: a bad adapter or flag stops it, in one line naming it.


@pytest.mark.parametrize("problem", ["missing", "corrupt", "foreign"])
async def test_a_bad_adapter_stops_the_start_up_naming_it(
    make_app: AppFactory,
    lora_runner: DiffusersRunner,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
    problem: str,
) -> None:
    bad = bad_adapter(problem, tmp_path)
    with pytest.raises(EngineUnavailableError) as refused:
        await make_app(lora_runner, [*lora_flags(tiny_loras, "style"), f"bad={bad}"])
    message = str(refused.value)
    assert message.startswith("--lora-modules: LoRA adapter 'bad'") and "\n" not in message


async def test_an_adapter_above_max_lora_rank_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from vllm_omni_images.engine.base import LoRAAdapter
    from vllm_omni_images.engine.errors import LoRAAdapterError

    rank_16 = build_tiny_lora(tiny_model_dir, tmp_path, seed=9, rank=16)
    runner = DiffusersRunner(str(tiny_model_dir), device="cpu", lora=LoRASettings(max_lora_rank=8))
    try:
        with pytest.raises(LoRAAdapterError, match="rank 16 is above --max-lora-rank 8"):
            runner.add_lora(LoRAAdapter("big", 1, str(rank_16)))
    finally:
        runner.close()


def bad_adapter(problem: str, folder: Path) -> Path:
    """An adapter that cannot be served: not there, not a safetensors file, or of another
    model."""
    if problem == "missing":
        return folder / "nowhere"
    if problem == "corrupt":
        (folder / "corrupt.safetensors").write_bytes(b"not a safetensors file")
        return folder / "corrupt.safetensors"
    return write_foreign_lora(folder)


# Runtime loading and unloading (VLLM_ALLOW_RUNTIME_LORA_UPDATING), through vLLM's routes.


@pytest.fixture
async def runtime_client(
    make_app: AppFactory,
    lora_runner: DiffusersRunner,
    tiny_loras: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> httpx.AsyncClient:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    app = await make_app(lora_runner, lora_flags(tiny_loras, "style"))
    return http_client(app)


async def model_ids(client: httpx.AsyncClient) -> set[str]:
    return {card["id"] for card in (await client.get("/v1/models")).json()["data"]}


async def test_adapters_load_and_unload_at_runtime(
    runtime_client: httpx.AsyncClient, tiny_loras: dict[str, Path]
) -> None:
    async with runtime_client as client:
        base = await image(client)
        assert_openai_error(await generate(client, model="third", **FAST), 404, "model")
        loaded = await client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "third", "lora_path": str(tiny_loras["third"])},
        )
        assert loaded.status_code == 200, loaded.text
        assert await model_ids(client) == {BASE, "style", "third"}
        third = await image(client, model="third")
        assert differ(third, base) > 10 and differ(third, await image(client, model="style")) > 10
        unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "third"})
        assert unloaded.status_code == 200, unloaded.text
        assert await model_ids(client) == {BASE, "style"}
        assert_openai_error(await generate(client, model="third", **FAST), 404, "model")
        assert differ(await image(client), base) <= SAME_IMAGE


@pytest.mark.parametrize("problem", ["missing", "corrupt", "foreign"])
async def test_loading_a_bad_adapter_is_a_400_and_the_server_keeps_serving(
    runtime_client: httpx.AsyncClient, tmp_path: Path, problem: str
) -> None:
    path = bad_adapter(problem, tmp_path)
    async with runtime_client as client:
        response = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(path)}
        )
        error = assert_openai_error(response, 400, "lora_path")
        assert error["message"].startswith("LoRA adapter 'bad' cannot be served: ")
        assert str(path) not in error["message"]  # as vLLM, file paths stay out of messages
        assert await model_ids(client) == {BASE, "style"}
        assert (await generate(client, model="style", **FAST)).status_code == 200


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_an_adapter_in_each_layout_gives_the_image_of_diffusers_layout(
    runtime_client: httpx.AsyncClient, tiny_loras: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    """`style`'s weights written in Kohya's, musubi-tuner's, ComfyUI's, ai-toolkit's, PEFT's
    layouts (testing/tiny_lora.py), loaded at runtime under a name of their own, give the
    image of `style` itself (diffusers' layout), read through QwenImagePipeline's converter."""
    path = write_layout(layout, tiny_lora_weights(tiny_loras["style"]), tmp_path)
    async with runtime_client as client:
        loaded = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": "same", "lora_path": str(path)}
        )
        assert loaded.status_code == 200, loaded.text
        same, style = await image(client, model="same"), await image(client, model="style")
        assert differ(same, style) <= SAME_IMAGE  # and style's differs from the base model's


async def test_an_adapter_diffusers_cannot_serve_is_refused_naming_it_and_why(
    runtime_client: httpx.AsyncClient, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    """LoKr, LoHa, DoRA, a text encoder's weights, biases, a file diffusers' converter raises
    on: a 400 naming the adapter and the reason, and the server serves on."""
    weights = tiny_lora_weights(tiny_loras["style"])
    async with runtime_client as client:
        for kind, reason in UNSERVABLE.items():
            path = write_unservable(kind, weights, tmp_path / kind.replace(" ", "-"))
            response = await client.post(
                "/v1/load_lora_adapter", json={"lora_name": "odd", "lora_path": str(path)}
            )
            error = assert_openai_error(response, 400, "lora_path")
            assert error["message"].startswith("LoRA adapter 'odd' cannot be served: "), kind
            assert reason in error["message"] and "\n" not in error["message"], kind
        assert await model_ids(client) == {BASE, "style"}


SECRET = "SECRET-IN-HEADER-42"


async def test_a_refusal_quotes_nothing_of_the_files_and_cannot_probe_paths(
    runtime_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """What the server's files hold, and whether a path exists or is readable, is not the
    business of a client: nothing there, a system file, a folder, a safetensors file whose
    header holds words, and a file that is no safetensors file all get the same answer."""
    from safetensors.torch import save_file

    secret = tmp_path / "secret.safetensors"
    save_file({SECRET: torch.zeros(2)}, str(secret), metadata={"note": SECRET})
    (tmp_path / "words.safetensors").write_text(f'{{"{SECRET}": 1}}')
    paths = [tmp_path / "nowhere", Path("/etc/passwd"), tmp_path, secret]
    async with runtime_client as client:
        messages = set()
        for path in [*paths, tmp_path / "words.safetensors"]:
            response = await client.post(
                "/v1/load_lora_adapter", json={"lora_name": "probe", "lora_path": str(path)}
            )
            error = assert_openai_error(response, 400, "lora_path")
            assert SECRET not in response.text and str(path) not in response.text
            messages.add(error["message"])
        assert len(messages) == 1, messages


async def test_a_huge_adapter_above_max_lora_rank_is_refused_from_its_header_alone(
    runtime_client: httpx.AsyncClient,
    lora_runner: DiffusersRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1 GiB adapter (sparse: its weights are a hole) for the served model's own layer, of
    a rank above --max-lora-rank, is refused without its weights being read."""
    layer = lora_runner.pipeline.transformer.transformer_blocks[0].attn.to_q
    rank = 2**30 // ((layer.in_features + layer.out_features) * 4)
    huge = write_sparse_lora(
        tmp_path / "huge.safetensors",
        "transformer_blocks.0.attn.to_q",
        layer.in_features,
        layer.out_features,
        rank,
    )
    assert huge.stat().st_size >= 2**30 - 2**20

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read")

    monkeypatch.setattr("safetensors.safe_open", no_weights)
    async with runtime_client as client:
        response = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": "huge", "lora_path": str(huge)}
        )
        error = assert_openai_error(response, 400, "lora_path")
        assert error["message"] == (
            f"LoRA adapter 'huge' cannot be served: its rank {rank} is above --max-lora-rank 16."
        )


@pytest.mark.parametrize(
    "name",
    [BASE, "org/style", "a" * 5000, "", "_style", "style\nv2"],
    ids=["base", "slash", "5000-chars", "empty", "underscore-first", "newline"],
)
async def test_an_adapter_name_of_a_base_model_or_outside_the_pattern_is_a_400(
    runtime_client: httpx.AsyncClient, tiny_loras: dict[str, Path], name: str
) -> None:
    """A name that would shadow the base model (listed twice in /v1/models, unreachable) or
    is not of the one pattern (letters, digits, '.', '_', '-'; at most 64) is refused."""
    async with runtime_client as client:
        response = await client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(tiny_loras["third"])},
        )
        error = assert_openai_error(response, 400, "lora_name")
        assert error["message"].startswith("lora_name ") and len(error["message"]) < 400
        assert [card["id"] for card in (await client.get("/v1/models")).json()["data"]] == [
            BASE,
            "style",
        ]
        assert (
            await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        ).status_code == (400 if name == "" else 404)


async def test_an_adapter_named_as_the_base_model_stops_the_start_up(
    make_app: AppFactory, lora_runner: DiffusersRunner, tiny_loras: dict[str, Path]
) -> None:
    with pytest.raises(
        EngineUnavailableError,
        match=r"^--lora-modules: lora_name 'tiny-qwen-image' is the base model's",
    ):
        await make_app(
            lora_runner, ["--enable-lora", "--lora-modules", f"{BASE}={tiny_loras['style']}"]
        )


async def test_unloading_an_adapter_in_use_lets_its_requests_finish_with_it(
    runtime_client: httpx.AsyncClient,
) -> None:
    """vLLM's unload only stops new requests from naming the adapter: the ones already
    admitted run with it, and nothing is lost."""
    async with runtime_client as client:
        alone = await image(client, model="style")
        running = [asyncio.create_task(image(client, model="style")) for _ in range(3)]
        await asyncio.sleep(0.05)  # admitted, and waiting or running
        unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "style"})
        assert unloaded.status_code == 200
        for result in await asyncio.gather(*running):
            assert differ(result, alone) <= SAME_IMAGE
        assert_openai_error(await generate(client, model="style", **FAST), 404, "model")


# An adapter whose files go away or break after it left host memory (--max-cpu-loras).


@pytest.fixture(scope="module")
def one_slot_runner(tiny_model_dir: Path) -> Iterator[DiffusersRunner]:
    """One adapter loaded and one kept read: naming another evicts it, to be read again."""
    runner = DiffusersRunner(
        str(tiny_model_dir), device="cpu", lora=LoRASettings(max_loras=1, max_cpu_loras=1)
    )
    yield runner
    runner.close()


async def test_an_evicted_adapter_whose_files_broke_fails_only_its_own_requests(
    make_app: AppFactory,
    one_slot_runner: DiffusersRunner,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Its requests are a 503 naming it (not a 500), the others' run as before, /v1/models
    leaves it out while it cannot be used, and it is back once its files are."""
    victim = tmp_path / "victim"
    shutil.copytree(tiny_loras["third"], victim)
    flags = ["--enable-lora", "--lora-modules", f"style={tiny_loras['style']}", f"victim={victim}"]
    async with http_client(await make_app(one_slot_runner, flags)) as client:
        base, styled = await image(client), await image(client, model="style")
        good = await image(client, model="victim")  # now the one read: style is evicted
        await image(client, model="style")  # read again: victim is evicted
        weights = victim / "pytorch_lora_weights.safetensors"
        saved = weights.read_bytes()
        for breakage in ("deleted", "corrupt", "another model"):
            shutil.rmtree(victim, ignore_errors=True)
            if breakage == "corrupt":
                victim.mkdir()
                weights.write_bytes(saved[: len(saved) // 2])
            elif breakage == "another model":
                write_foreign_lora(victim)
            results = await asyncio.gather(
                generate(client, model="victim", **FAST),
                generate(client, model="style", **FAST, seed=11),
                generate(client, **FAST, seed=11),
            )
            error = assert_openai_error(results[0], 503, "model")
            assert error["message"].startswith("LoRA adapter 'victim' is not available: ")
            assert str(victim) not in error["message"]
            assert differ(pixels(results[1].json()["data"][0]["b64_json"]), styled) <= SAME_IMAGE
            assert differ(pixels(results[2].json()["data"][0]["b64_json"]), base) <= SAME_IMAGE
            assert await model_ids(client) == {BASE, "style"}, breakage
        shutil.rmtree(victim, ignore_errors=True)
        victim.mkdir()
        weights.write_bytes(saved)
        assert differ(await image(client, model="victim"), good) <= SAME_IMAGE
        assert await model_ids(client) == {BASE, "style", "victim"}


async def test_lora_resolver_plugins_are_asked_only_for_names_an_adapter_may_have(
    make_app: AppFactory, lora_runner: DiffusersRunner
) -> None:
    """vLLM's resolvers turn a request's `model` into an adapter (its filesystem resolver
    joins it to a folder): a name like `../x` never reaches them."""
    from vllm.lora.request import LoRARequest

    asked: list[str] = []

    class Recorder:
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            asked.append(lora_name)
            return None

    app = await make_app(lora_runner, ["--enable-lora"])
    models = app.state.openai_serving_models
    models.lora_resolvers.append(Recorder())
    for name in ("../secrets", "a/b", BASE, "x" * 65):
        refused = await models.resolve_lora(name)
        assert refused.error.code == 404 and len(refused.error.message) < 200
    assert asked == []
    assert (await models.resolve_lora("style-v2")).error.code == 404
    assert asked == ["style-v2"]


# Stacks: several adapters in one request (`lora`), applied together with set_adapters.


@pytest.fixture
async def stack_client(
    make_app: AppFactory,
    lora_runner: DiffusersRunner,
    tiny_model_dir: Path,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
) -> httpx.AsyncClient:
    """Two adapters a request (--max-loras 2), three served, and `summed`: one adapter file
    holding style's delta x 0.8 plus other's x 0.6."""
    parts = [(tiny_loras["style"], 0.8), (tiny_loras["other"], 0.6)]
    summed = write_summed_lora(tiny_model_dir, parts, tmp_path / "summed")
    flags = [*lora_flags(tiny_loras, "style", "other", "third"), f"summed={summed}"]
    app = await make_app(lora_runner, [*flags, "--max-loras", "2", "--image-max-batch-size", "4"])
    return http_client(app)


STACK = [{"name": "style", "scale": 0.8}, {"name": "other", "scale": 0.6}]


async def test_a_stack_gives_the_image_of_one_adapter_of_its_summed_delta_in_any_order(
    stack_client: httpx.AsyncClient,
) -> None:
    async with stack_client as client:
        stacked = await image(client, lora=STACK)
        summed = await image(client, model="summed")
        reversed_ = await image(client, lora=STACK[::-1])
        with_model = await image(client, model="other", lora_scale=0.6, lora=STACK[0])
        singles = [await image(client, model=name) for name in ("style", "other", BASE)]
    assert differ(stacked, summed) <= SAME_IMAGE
    assert differ(reversed_, stacked) == 0 and differ(with_model, stacked) == 0
    assert all(differ(stacked, single) > 10 for single in singles)


async def test_a_mix_of_base_adapters_and_stacks_gets_the_images_each_gets_alone(
    stack_client: httpx.AsyncClient,
) -> None:
    """Eight at once, batched by stack; each kind (the same stack, however it is named) is
    also made alone first."""
    other_way = [{"name": "style", "scale": 0.5}, {"name": "third", "scale": -0.7}]
    choices: list[tuple[str, dict[str, object]]] = [
        ("base", {}),
        ("style", {"model": "style"}),
        ("stack", {"lora": STACK}),
        ("other way", {"lora": other_way}),
        ("other", {"model": "other"}),
        ("stack", {"lora": STACK[::-1]}),
        ("base", {}),
        ("other way", {"model": "third", "lora_scale": -0.7, "lora": other_way[0]}),
    ]
    async with stack_client as client:
        alone = {}
        for kind, fields in choices:
            if kind not in alone:
                alone[kind] = await image(client, **fields)
        mixed = await asyncio.gather(*(image(client, **fields) for _, fields in choices))
    for (kind, fields), result in zip(choices, mixed, strict=True):
        assert differ(result, alone[kind]) <= SAME_IMAGE, fields


@pytest.mark.parametrize(
    ("fields", "status", "param", "fragment"),
    [
        (
            {"lora": [*STACK, {"name": "third"}]},
            400,
            "lora",
            "applies 3 LoRA adapters and this server applies at most 2 together (--max-loras)",
        ),
        ({"model": "style", "lora": [STACK[0]]}, 400, "lora", "'style' is named twice"),
        ({"lora": [STACK[0], {"name": "style", "scale": 0.1}]}, 400, "lora", "named twice"),
        ({"lora": [{"name": "nope"}]}, 404, "lora", "`nope` in lora does not exist"),
        ({"lora": STACK, "lora_scale": 0.5}, 400, "lora_scale", "is the base model"),
        ({"lora": [{"name": "style", "path": "/etc"}]}, 400, "lora", "path is not read here"),
    ],
    ids=["over-max-loras", "in-model-and-lora", "listed-twice", "unknown", "scale", "path"],
)
async def test_stacks_are_refused_by_name_before_any_work(
    stack_client: httpx.AsyncClient,
    fields: dict[str, object],
    status: int,
    param: str,
    fragment: str,
) -> None:
    async with stack_client as client:
        error = assert_openai_error(await generate(client, **FAST, **fields), status)
    assert param in error["param"].split(".")  # `body.lora.0`: the entry with a path
    assert fragment in error["message"]


async def test_an_edit_takes_lora_as_json_text(stack_client: httpx.AsyncClient) -> None:
    from tests.support.images import png

    async def edit(**fields: str) -> httpx.Response:
        return await client.post(
            "/v1/images/edits",
            data={"prompt": "a red fox", "seed": "3", "num_inference_steps": "2", **fields},
            files={"image": ("in.png", png(), "image/png")},
        )

    def edited(response: httpx.Response) -> np.ndarray:
        assert response.status_code == 200, response.text
        return pixels(response.json()["data"][0]["b64_json"]).astype(int)

    async with stack_client as client:
        base = edited(await edit())
        styled = edited(await edit(model="style"))
        one = edited(await edit(lora=json.dumps({"name": "style"})))
        stacked = edited(await edit(lora=json.dumps(STACK)))
        summed = edited(await edit(model="summed"))
        assert_openai_error(await edit(lora="style"), 400, "lora")  # not JSON text
    assert differ(one, styled) == 0 and differ(styled, base) > 10
    assert differ(stacked, summed) <= SAME_IMAGE and differ(stacked, styled) > 10
