"""LoRA adapters on the vllm-omni engine: vllm-omni's own LoRA manager, in its real worker, on
CPU, with this package's PEFT copies (`engine/omni_adapters.py`); images compared with the
diffusers engine's and across the layouts adapters ship in, and the adapters served as model
names through the API. Its own engine (one in-process engine lives at a time in a test
process)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
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
from vllm_omni_images.engine.base import LoRAAdapter, LoRASettings
from vllm_omni_images.engine.client import ImageEngineClient
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.engine.omni_engine import OmniEngine

from .conftest import AppFactory
from .helpers import FAST, generate, http_client, pixels


@pytest.fixture(scope="module")
def omni_engine(tiny_model_dir: Path) -> Iterator[OmniEngine]:
    engine = build_engine(tiny_model_dir, lora=LoRASettings(max_loras=1, max_cpu_loras=2))
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
