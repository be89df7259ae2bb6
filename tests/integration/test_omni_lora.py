"""LoRA adapters on the vllm-omni engine: vllm-omni's own LoRA manager, in its real worker, on
CPU, with this package's PEFT copies (`engine/omni_adapters.py`); images compared with the
diffusers engine's and across the layouts adapters ship in, and the adapters served as model
names through the API. Its own engine (one in-process engine lives at a time in a test
process)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Iterator
from pathlib import Path

import numpy as np
import pytest

from testing.tiny_lora import LAYOUTS, UNSERVABLE, tiny_lora_weights, write_layout, write_unservable
from tests.support.engines import req
from tests.support.omni import (
    SAME_IMAGE,
    WorkerProbe,
    admitted,
    build_engine,
    difference,
    images_from,
)
from tests.support.stacks import write_summed_lora
from vllm_omni_images.engine.base import AdapterStack, LoRAAdapter, LoRASettings, ScaledAdapter
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.omni_engine import OmniEngine

from .conftest import AppFactory
from .helpers import FAST, assert_openai_error, generate, http_client, pixels


@pytest.fixture(scope="module")
def omni_engine(tiny_model_dir: Path) -> Iterator[OmniEngine]:
    # Two adapters a request (a stack), two kept read by vllm-omni's worker.
    engine = build_engine(tiny_model_dir, lora=LoRASettings(max_loras=2, max_cpu_loras=2))
    yield engine
    asyncio.run(engine.close())


@pytest.fixture
def client(omni_engine: OmniEngine) -> ImageEngineClient:
    return admitted(omni_engine)


@pytest.fixture(scope="module")
def lora_runner(tiny_model_dir: Path) -> Iterator[DiffusersRunner]:
    """The diffusers engine's runner with adapters, to compare images with."""
    runner = DiffusersRunner(str(tiny_model_dir), device="cpu", lora=LoRASettings(max_loras=2))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def adapters(
    omni_engine: OmniEngine, lora_runner: DiffusersRunner, tiny_loras: dict[str, Path]
) -> dict[str, LoRAAdapter]:
    """Two adapters, added to both engines (ids as vLLM's serving models would give them)."""
    added = {}
    for adapter_id, name in enumerate(("style", "other"), start=101):
        adapter = LoRAAdapter(name, adapter_id, str(tiny_loras[name]))
        asyncio.run(omni_engine.add_lora(adapter))
        lora_runner.add_lora(adapter)
        added[name] = adapter
    return added


async def test_an_adapter_gives_the_diffusers_engines_image(
    client: ImageEngineClient,
    worker: WorkerProbe,
    lora_runner: DiffusersRunner,
    adapters: dict[str, LoRAAdapter],
) -> None:
    [base] = await images_from(client, req(7))
    for adapter in adapters.values():
        for scale in (1.0, 0.5):
            request = req(7, lora=adapter, lora_scale=scale)
            [omni] = await images_from(client, request)
            [[diffusers]] = await asyncio.to_thread(lora_runner.run, [request])
            assert difference(omni, diffusers) <= SAME_IMAGE, (adapter.name, scale)
            assert difference(omni, base) > 5 * SAME_IMAGE
    [after] = await images_from(client, req(7))
    assert difference(after, base) <= SAME_IMAGE


async def test_a_mix_of_adapters_gets_the_images_each_gets_alone(
    client: ImageEngineClient, worker: WorkerProbe, adapters: dict[str, LoRAAdapter]
) -> None:
    choices = [None, adapters["style"], adapters["other"], None, adapters["style"]]
    alone = {}
    for adapter in set(choices):
        [alone[adapter]] = await images_from(client, req(3, lora=adapter))
    worker.waves.clear()
    mixed = await asyncio.gather(*(images_from(client, req(3, lora=a)) for a in choices))
    for adapter, [result] in zip(choices, mixed, strict=True):
        assert difference(result, alone[adapter]) <= SAME_IMAGE
    assert len(worker.waves) >= 3  # vllm-omni runs one adapter per batch


async def test_an_adapter_of_another_model_is_refused_and_the_engine_serves_on(
    client: ImageEngineClient, omni_engine: OmniEngine, tmp_path: Path
) -> None:
    from testing.tiny_lora import write_foreign_lora
    from vllm_omni_images.engine.errors import LoRAAdapterError

    write_foreign_lora(tmp_path)
    with pytest.raises(LoRAAdapterError, match=r"'foreign'.*another model"):
        await omni_engine.add_lora(LoRAAdapter("foreign", 199, str(tmp_path)))
    assert len(await images_from(client, req(1))) == 1


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_an_adapter_in_each_layout_gives_the_image_of_diffusers_layout(
    client: ImageEngineClient,
    omni_engine: OmniEngine,
    adapters: dict[str, LoRAAdapter],
    tiny_loras: dict[str, Path],
    tmp_path: Path,
    layout: str,
) -> None:
    """`style`'s weights written in Kohya's, musubi-tuner's, ComfyUI's, ai-toolkit's, PEFT's
    layouts (testing/tiny_lora.py), added under a name and id of their own, give the image of
    `style` itself (diffusers' layout): the PEFT copy vllm-omni loads is the same."""
    path = write_layout(layout, tiny_lora_weights(tiny_loras["style"]), tmp_path)
    adapter = LoRAAdapter(f"style-{layout}", 300 + LAYOUTS.index(layout), str(path))
    await omni_engine.add_lora(adapter)
    [same] = await images_from(client, req(7, lora=adapter))
    [style] = await images_from(client, req(7, lora=adapters["style"]))
    assert difference(same, style) <= SAME_IMAGE  # and style's differs from the base model's


async def test_an_adapter_diffusers_cannot_serve_is_refused_naming_it_and_why(
    client: ImageEngineClient, omni_engine: OmniEngine, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    """LoKr, LoHa, DoRA, a text encoder's weights, biases, a file diffusers' converter raises
    on: refused in one line naming the adapter and the reason; the engine serves on."""
    from vllm_omni_images.engine.errors import LoRAAdapterError

    weights = tiny_lora_weights(tiny_loras["style"])
    for kind, reason in UNSERVABLE.items():
        path = write_unservable(kind, weights, tmp_path / kind.replace(" ", "-"))
        with pytest.raises(LoRAAdapterError) as refused:
            await omni_engine.add_lora(LoRAAdapter("odd", 198, str(path)))
        message = str(refused.value)
        assert message.startswith("LoRA adapter 'odd' cannot be served: "), kind
        assert reason in message and "\n" not in message, kind
    assert len(await images_from(client, req(1))) == 1


async def test_an_adapter_whose_copy_went_away_is_copied_again_or_fails_alone(
    client: ImageEngineClient,
    omni_engine: OmniEngine,
    adapters: dict[str, LoRAAdapter],
    tiny_loras: dict[str, Path],
    tmp_path: Path,
) -> None:
    """vllm-omni reads an evicted adapter again from the PEFT copy: a copy that went away (a
    temporary-file cleaner) is written again from the adapter's files; with those gone too,
    the adapter's requests fail with `LoRAAdapterUnavailableError`, and no other's."""
    from vllm_omni_images.engine.errors import LoRAAdapterUnavailableError

    own = tmp_path / "own"
    shutil.copytree(tiny_loras["other"], own)
    adapter = LoRAAdapter("own", 197, str(own))
    await omni_engine.add_lora(adapter)
    [before] = await images_from(client, req(3, lora=adapter))
    assert omni_engine._adapters is not None
    copy = Path((await omni_engine._adapters.request_for(adapter) or pytest.fail()).lora_path)
    shutil.rmtree(copy)
    [again] = await images_from(client, req(3, lora=adapter))
    assert difference(again, before) <= SAME_IMAGE
    copy = Path((await omni_engine._adapters.request_for(adapter) or pytest.fail()).lora_path)
    assert copy.is_dir()
    shutil.rmtree(copy)
    shutil.rmtree(own)
    with pytest.raises(LoRAAdapterUnavailableError, match=r"^LoRA adapter 'own' is not available"):
        await images_from(client, req(3, lora=adapter))
    assert omni_engine.unavailable_adapters() == {197}
    assert len(await images_from(client, req(3, lora=adapters["style"]))) == 1
    shutil.copytree(tiny_loras["other"], own)
    [back] = await images_from(client, req(3, lora=adapter))
    assert difference(back, before) <= SAME_IMAGE
    assert omni_engine.unavailable_adapters() == frozenset()


async def test_adapters_are_served_as_model_names_through_the_api(
    make_app: AppFactory, omni_engine: OmniEngine, tiny_loras: dict[str, Path], adapters: dict
) -> None:
    flags = ["--enable-lora", "--lora-modules", f"style={tiny_loras['style']}"]
    async with http_client(await make_app(omni_engine, flags)) as http:
        cards = (await http.get("/v1/models")).json()["data"]
        assert [(c["id"], c.get("parent")) for c in cards] == [
            ("tiny-qwen-image", None),
            ("style", "tiny-qwen-image"),
        ]
        seeded = {**FAST, "seed": 5}
        base = (await generate(http, **seeded)).json()["data"][0]["b64_json"]
        styled = await generate(http, model="style", lora_scale=0.5, **seeded)
        assert styled.status_code == 200, styled.text
        styled_pixels = pixels(styled.json()["data"][0]["b64_json"])
        assert np.abs(styled_pixels.astype(int) - pixels(base).astype(int)).max() > 10


# Stacks: several adapters in one request, applied by vllm-omni as one adapter of their summed
# delta (`OmniAdapters.stack_request`).


def stack(*scaled: tuple[LoRAAdapter, float]) -> AdapterStack:
    return tuple(ScaledAdapter(adapter, scale) for adapter, scale in scaled)


def lora_ids(worker: WorkerProbe) -> list[set[int | None]]:
    """The adapter ids (vllm-omni's `lora_int_id`) of each batch the worker ran."""
    return [
        {getattr(r.sampling_params.lora_request, "lora_int_id", None) for r in batch}
        for batch in worker.batches
    ]


async def test_a_stack_gives_the_image_of_one_adapter_of_its_summed_delta(
    client: ImageEngineClient,
    omni_engine: OmniEngine,
    lora_runner: DiffusersRunner,
    adapters: dict[str, LoRAAdapter],
    tiny_model_dir: Path,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
) -> None:
    """... and the diffusers engine's image of the same stack (`set_adapters`)."""
    parts = [(tiny_loras["style"], 0.8), (tiny_loras["other"], 0.6)]
    summed = LoRAAdapter("summed", 150, str(write_summed_lora(tiny_model_dir, parts, tmp_path)))
    await omni_engine.add_lora(summed)
    both = stack((adapters["style"], 0.8), (adapters["other"], 0.6))
    [stacked] = await images_from(client, req(7, loras=both))
    [one] = await images_from(client, req(7, lora=summed))
    [[diffusers]] = await asyncio.to_thread(lora_runner.run, [req(7, loras=both)])
    assert difference(stacked, one) <= SAME_IMAGE
    assert difference(stacked, diffusers) <= SAME_IMAGE
    for single in (adapters["style"], adapters["other"], None):
        [alone] = await images_from(client, req(7, lora=single))
        assert difference(stacked, alone) > 5 * SAME_IMAGE


async def test_a_mix_of_base_adapters_and_stacks_gets_the_images_each_gets_alone(
    client: ImageEngineClient, worker: WorkerProbe, adapters: dict[str, LoRAAdapter]
) -> None:
    style, other = adapters["style"], adapters["other"]
    choices = [
        (),
        stack((style, 1.0)),
        stack((style, 0.8), (other, 0.6)),
        stack((other, 1.0)),
        stack((style, 0.5), (other, -0.5)),
        (),
        stack((style, 0.8), (other, 0.6)),
        stack((style, 1.0)),
    ]
    alone = {}
    for choice in set(choices):
        [alone[choice]] = await images_from(client, req(3, loras=choice))
    worker.waves.clear()
    mixed = await asyncio.gather(*(images_from(client, req(3, loras=c)) for c in choices))
    for choice, [result] in zip(choices, mixed, strict=True):
        assert difference(result, alone[choice]) <= SAME_IMAGE, choice
    assert all(len(ids) == 1 for ids in lora_ids(worker))  # a batch holds one stack


async def test_a_stack_is_written_once_and_again_when_an_adapter_or_its_copy_changed(
    client: ImageEngineClient, omni_engine: OmniEngine, adapters: dict[str, LoRAAdapter]
) -> None:
    """Concurrent first requests share one copy; an adapter loaded again in place (new
    weights), or the copy gone, gets the stack written and loaded again, under a new id
    apart from vLLM's."""
    from vllm_omni.lora.request import LoRARequest

    from vllm_omni_images.engine.omni_adapters import FIRST_STACK_ID

    assert omni_engine._adapters is not None
    loaded: list[int] = []

    def load(request: LoRARequest, replace: bool) -> Awaitable[None]:
        loaded.append(request.lora_int_id)
        return omni_engine._loop.submit(omni_engine._load_lora(request, replace))

    both = stack((adapters["style"], 0.3), (adapters["other"], 0.7))
    first = await asyncio.gather(
        *(omni_engine._adapters.stack_request(both, load) for _ in range(4))
    )
    assert len({request.lora_int_id for request in first}) == 1 and len(loaded) == 1
    assert FIRST_STACK_ID <= loaded[0] < 2**31
    assert await omni_engine._adapters.stack_request(both, load) == first[0]
    [before] = await images_from(client, req(5, loras=both))

    await omni_engine.add_lora(adapters["other"])  # in place: its weights may have changed
    again = await omni_engine._adapters.stack_request(both, load)
    assert again.lora_int_id != first[0].lora_int_id and len(loaded) == 2
    assert not await asyncio.to_thread(Path(first[0].lora_path).is_dir)  # deleted
    shutil.rmtree(again.lora_path)
    rewritten = await omni_engine._adapters.stack_request(both, load)
    assert rewritten.lora_int_id != again.lora_int_id and len(loaded) == 3
    [after] = await images_from(client, req(5, loras=both))
    assert difference(after, before) <= SAME_IMAGE


async def test_a_stack_with_an_adapter_whose_files_went_away_fails_alone(
    client: ImageEngineClient,
    omni_engine: OmniEngine,
    adapters: dict[str, LoRAAdapter],
    tiny_loras: dict[str, Path],
    tmp_path: Path,
) -> None:
    from vllm_omni_images.engine.errors import LoRAAdapterUnavailableError

    own = tmp_path / "own"
    shutil.copytree(tiny_loras["third"], own)
    adapter = LoRAAdapter("own", 196, str(own))
    await omni_engine.add_lora(adapter)
    shutil.rmtree(own)
    both = stack((adapters["style"], 1.0), (adapter, 0.5))
    with pytest.raises(LoRAAdapterUnavailableError, match=r"^LoRA adapter 'own' is not available"):
        await images_from(client, req(3, loras=both))
    assert omni_engine.unavailable_adapters() == {196}
    assert len(await images_from(client, req(3, loras=stack((adapters["style"], 0.9))))) == 1
    shutil.copytree(tiny_loras["third"], own)
    assert len(await images_from(client, req(3, loras=both))) == 1
    assert omni_engine.unavailable_adapters() == frozenset()


async def test_stacks_through_the_api_in_any_order_and_up_to_the_rank_vllm_omni_takes(
    make_app: AppFactory,
    omni_engine: OmniEngine,
    tiny_loras: dict[str, Path],
    adapters: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The order of `lora` changes nothing, to the pixel; a stack whose summed rank is above
    what vllm-omni's LoRA manager takes is a 400 naming its adapters."""
    names = ("style", "other")
    flags = ["--enable-lora", "--max-loras", "2", "--lora-modules"]
    flags += [f"{name}={tiny_loras[name]}" for name in names]
    async with http_client(await make_app(omni_engine, flags)) as http:
        seeded = {**FAST, "seed": 5}
        orders: list[dict[str, object]] = [
            {"lora": [{"name": "style", "scale": 0.8}, {"name": "other", "scale": 0.6}]},
            {"lora": [{"name": "other", "scale": 0.6}, {"name": "style", "scale": 0.8}]},
            {"model": "other", "lora_scale": 0.6, "lora": {"name": "style", "scale": 0.8}},
        ]
        images = []
        for fields in orders:
            response = await generate(http, **seeded, **fields)
            assert response.status_code == 200, response.text
            images.append(pixels(response.json()["data"][0]["b64_json"]))
        assert all(np.array_equal(image, images[0]) for image in images)
        assert omni_engine._adapters is not None
        monkeypatch.setattr(omni_engine._adapters, "max_stack_rank", 4)  # each is of rank 4
        lower = [{"name": "style", "scale": 0.5}, {"name": "other", "scale": 0.5}]
        error = assert_openai_error(await generate(http, **seeded, lora=lower), 400, "lora")
        assert error["message"].startswith("The LoRA adapters 'style', 'other' cannot be ")
        assert "summed rank, 8, above the 4" in error["message"]
        assert (await generate(http, **seeded, lora=lower[:1])).status_code == 200
