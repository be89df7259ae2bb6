"""The ComfyUI node package (`examples/comfyui/comfyui_vllm_images`) against the live server.

The package is loaded as ComfyUI's `nodes.load_custom_node` loads a custom node folder (its
`__init__.py` imported from the path under a path-derived module name, as a package), its
mappings read, and the nodes' functions called with ComfyUI-shaped tensors: `IMAGE` float32
`[B, H, W, 3]` in 0..1, `MASK` float32 `[B, H, W]` (or `[H, W]`) with 1 = area to change.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import logging
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from testing.server_process import free_port
from vllm_omni_images.images.encoding import decode_image_base64

from .live_server import ADAPTERS, API_KEY, AUTH, SERVED_NAMES

pytestmark = pytest.mark.e2e

PACKAGE_DIR = Path(__file__).parents[2] / "examples" / "comfyui" / "comfyui_vllm_images"
SHIPPED_WITH_COMFYUI = {"torch", "numpy", "PIL"}
STEPS = 2
SEED_MAX = 2**64 - 1
IMAGE_NODES = ("VLLMImageGenerate", "VLLMImageEdit")
STACK_TYPE = "VLLM_LORA_STACK"


def load_custom_node(module_path: Path) -> types.ModuleType:
    """What ComfyUI's `nodes.load_custom_node` does with a folder in `custom_nodes/`."""
    sys_module_name = str(module_path).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(
        sys_module_name,
        module_path / "__init__.py",
        submodule_search_locations=[str(module_path)],
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[sys_module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def package() -> types.ModuleType:
    return load_custom_node(PACKAGE_DIR)


@pytest.fixture(scope="module")
def generate(package):
    return package.NODE_CLASS_MAPPINGS["VLLMImageGenerate"]()


@pytest.fixture(scope="module")
def edit(package):
    return package.NODE_CLASS_MAPPINGS["VLLMImageEdit"]()


@pytest.fixture(scope="module")
def lora(package):
    return package.NODE_CLASS_MAPPINGS["VLLMImageLoRA"]()


def generate_args(server: str, **overrides):
    args = {
        "server_url": server,
        "prompt": "a lighthouse at dawn",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": STEPS,
        "true_cfg_scale": 4.0,
        "seed": 7,
        "batch_size": 1,
        "api_key": API_KEY,
        "model": "",
    }
    return {**args, **overrides}


def edit_args(server: str, image: torch.Tensor, **overrides):
    args = generate_args(server, width=0, height=0, strength=1.0)
    return {**args, "image": image, **overrides}


def gradient_image(batch: int = 1, height: int = 64, width: int = 64) -> torch.Tensor:
    """A smooth ComfyUI IMAGE, unlike anything the random-weight model draws."""
    ys = torch.linspace(0.0, 1.0, height)[:, None].expand(height, width)
    xs = torch.linspace(0.0, 1.0, width)[None, :].expand(height, width)
    one = torch.stack([xs, ys, 0.5 * torch.ones_like(xs)], dim=-1)
    return torch.stack([one.roll(shifts=index * 7, dims=1) for index in range(batch)])


def assert_comfy_image(images: torch.Tensor, batch: int, height: int, width: int) -> None:
    assert isinstance(images, torch.Tensor)
    assert images.dtype == torch.float32
    assert tuple(images.shape) == (batch, height, width, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.01  # an image, not a blank


def assert_same_images(batched: torch.Tensor, alone: torch.Tensor) -> None:
    """The same seed's images: byte-identical alone, within 1/255 when they ran in a batch
    beside other images (batched matrix products round differently; docs/images_api.md)."""
    assert batched.shape == alone.shape
    assert (batched - alone).abs().max().item() <= 1 / 255 + 1e-6


# Loading, as ComfyUI loads it.


def test_the_package_loads_as_comfyui_loads_a_custom_node(package):
    assert package.NODE_DISPLAY_NAME_MAPPINGS == {
        "VLLMImageGenerate": "vLLM Image Generate",
        "VLLMImageEdit": "vLLM Image Edit",
        "VLLMImageLoRA": "vLLM Image LoRA",
    }
    assert set(package.NODE_CLASS_MAPPINGS) == set(package.NODE_DISPLAY_NAME_MAPPINGS)
    for node in package.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(node, node.FUNCTION))
        assert node.CATEGORY == "image/vLLM" and node.DESCRIPTION
        assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES)
        inputs = node.INPUT_TYPES()
        assert set(inputs) == {"required", "optional"}
        for _name, (_kind, options) in {**inputs["required"], **inputs["optional"]}.items():
            assert options.get("tooltip"), _name
    # The LoRA node chains: a stack in (optional), the same type out.
    lora = package.NODE_CLASS_MAPPINGS["VLLMImageLoRA"]
    assert lora.RETURN_TYPES == (STACK_TYPE,)
    assert lora.INPUT_TYPES()["optional"]["lora_stack"][0] == STACK_TYPE
    assert lora.INPUT_TYPES()["required"]["strength"][1]["default"] == 1.0
    for node in map(package.NODE_CLASS_MAPPINGS.get, IMAGE_NODES):
        assert node.RETURN_TYPES == ("IMAGE",)
        inputs = node.INPUT_TYPES()
        seed = inputs["required"]["seed"][1]
        assert seed["min"] == 0 and seed["max"] == SEED_MAX and seed["control_after_generate"]
        for side in ("width", "height"):
            assert inputs["required"][side][1]["step"] == 16
        assert {"api_key", "model", "lora_scale", "lora_stack"} <= set(inputs["optional"])
        assert inputs["optional"]["lora_scale"][1]["default"] == 1.0
        assert inputs["optional"]["lora_stack"][0] == STACK_TYPE
    edit_inputs = package.NODE_CLASS_MAPPINGS["VLLMImageEdit"].INPUT_TYPES()
    assert edit_inputs["required"]["image"][0] == "IMAGE"
    assert edit_inputs["optional"]["mask"][0] == "MASK"


def test_the_package_imports_only_what_comfyui_ships():
    for path in PACKAGE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in SHIPPED_WITH_COMFYUI or top in sys.stdlib_module_names, (path, name)


def test_every_comfyui_seed_maps_to_an_int64_seed_one_to_one(package):
    request_seed = package.client.request_seed
    assert request_seed(0) == 0
    assert request_seed(2**63 - 1) == 2**63 - 1
    assert request_seed(2**63) == -(2**63)
    assert request_seed(SEED_MAX) == -1
    samples = [0, 1, 2**32, 2**63 - 1, 2**63, 2**63 + 1, SEED_MAX - 1, SEED_MAX]
    mapped = [request_seed(seed) for seed in samples]
    assert len(set(mapped)) == len(samples)
    assert all(-(2**63) <= seed < 2**63 for seed in mapped)
    assert mapped == [request_seed(seed) for seed in samples]  # the same every time
    # Back again: the server seeds its generator with `seed & (2**64 - 1)`, ComfyUI's value.
    assert [seed & SEED_MAX for seed in mapped] == samples


# Generate.


def test_generate_returns_batch_size_comfyui_images(generate, server):
    (images,) = generate.generate(**generate_args(server, batch_size=3, width=96, height=64))
    assert_comfy_image(images, 3, 64, 96)
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


def test_the_same_seed_gives_the_same_images_and_another_seed_others(generate, server):
    (first,) = generate.generate(**generate_args(server, seed=11, batch_size=2))
    (again,) = generate.generate(**generate_args(server, seed=11, batch_size=2))
    (other,) = generate.generate(**generate_args(server, seed=12, batch_size=1))
    assert torch.equal(first, again)
    assert not torch.equal(first[0], other[0])
    # Image i of a batch uses seed + i.
    assert_same_images(first[1], other[0])


def test_the_largest_comfyui_seed_works_and_wraps_to_seed_zero(generate, server):
    (images,) = generate.generate(**generate_args(server, seed=SEED_MAX, batch_size=2))
    assert_comfy_image(images, 2, 64, 64)
    (zero,) = generate.generate(**generate_args(server, seed=0))
    assert_same_images(images[1], zero[0])
    # The node's seed is the API's seed (two's complement): a direct request with -1 agrees.
    body = {"prompt": "a lighthouse at dawn", "size": "64x64", "seed": -1,
            "num_inference_steps": STEPS}  # fmt: skip
    response = httpx.post(f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    image = decode_image_base64(response.json()["data"][0]["b64_json"]).convert("RGB")
    direct = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    assert_same_images(images[0], direct)


def test_a_batch_larger_than_one_request_is_split_without_changing_images(generate, server):
    (large,) = generate.generate(**generate_args(server, seed=100, batch_size=12))
    assert_comfy_image(large, 12, 64, 64)
    (tail,) = generate.generate(**generate_args(server, seed=110, batch_size=2))
    assert_same_images(large[10:], tail)


def test_negative_prompt_true_cfg_model_and_unicode_prompt_are_sent(generate, server):
    plain = generate_args(server, prompt="un phare à l'aube, 灯台")
    (without,) = generate.generate(**plain)
    (guided,) = generate.generate(
        **{**plain, "negative_prompt": "blur", "true_cfg_scale": 5.0, "model": "tiny-qwen-image"}
    )
    assert_comfy_image(guided, 1, 64, 64)
    assert not torch.equal(without, guided)


def test_the_key_comes_from_the_environment_when_the_widget_is_empty(generate, server, monkeypatch):
    for variable in ("VLLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        monkeypatch.setenv(variable, API_KEY)
        (images,) = generate.generate(**generate_args(server, api_key=""))
        assert_comfy_image(images, 1, 64, 64)
    # The widget wins over the environment; VLLM_API_KEY over OPENAI_API_KEY.
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "a-real-openai-key")
    (images,) = generate.generate(**generate_args(server, api_key=""))
    assert_comfy_image(images, 1, 64, 64)


# Errors: the exception's text is the server's message.


def test_a_wrong_key_raises_with_the_servers_message(package, generate, server):
    with pytest.raises(package.client.ServerError) as raised:
        generate.generate(**generate_args(server, api_key="wrong"))
    assert raised.value.status == 401
    assert str(raised.value).startswith("Unauthorized")  # vLLM's {"error": "Unauthorized"}
    assert "api_key" in str(raised.value)


def test_an_invalid_value_raises_with_exactly_the_servers_message(package, generate, server):
    body = {"prompt": "x", "size": "72x64", "num_inference_steps": STEPS}
    direct = httpx.post(f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=60)
    assert direct.status_code == 400
    message = direct.json()["error"]["message"]
    assert "multiples of 16" in message
    with pytest.raises(package.client.ServerError) as raised:
        generate.generate(**generate_args(server, width=72))
    assert str(raised.value) == message
    assert raised.value.status == 400


def test_an_unreachable_server_raises_saying_so(package, generate):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(package.client.ServerError, match="Cannot reach the vLLM server"):
        generate.generate(**generate_args(url))


# Edit.


def test_edit_changes_the_masked_area_more_than_the_rest(edit, server):
    image = gradient_image()
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # ComfyUI: 1 = change the left half
    (edited,) = edit.edit(**edit_args(server, image, mask=mask))
    assert_comfy_image(edited, 1, 64, 64)
    change = (edited - image).abs().mean(dim=-1)[0]
    inside, outside = change[:, :32].mean().item(), change[:, 32:].mean().item()
    assert inside > 0.05 and inside > 5 * outside, (inside, outside)


def test_edit_takes_a_2d_mask_of_another_size_and_scales_it(edit, server):
    image = gradient_image()
    mask = torch.zeros(16, 16)  # [H, W], a quarter of the image's size
    mask[:, 8:] = 1.0  # the right half
    (edited,) = edit.edit(**edit_args(server, image, mask=mask))
    change = (edited - image).abs().mean(dim=-1)[0]
    inside, outside = change[:, 36:].mean().item(), change[:, :28].mean().item()
    assert inside > 0.05 and inside > 5 * outside, (inside, outside)


def test_edit_keeps_every_image_of_a_batch(edit, server):
    images = gradient_image(batch=2)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    (edited,) = edit.edit(**edit_args(server, images, mask=mask, batch_size=2))
    assert_comfy_image(edited, 4, 64, 64)
    # batch_size per input image, in input order: the kept border is each input's own.
    for index, source in ((0, 0), (1, 0), (2, 1), (3, 1)):
        border = (edited[index] - images[source]).abs()[:8].mean().item()
        assert border < 0.02, (index, border)
    (alone,) = edit.edit(**edit_args(server, images[1:], mask=mask, batch_size=2))
    assert_same_images(edited[2:], alone)  # each image is edited as it would be alone


def test_edit_makes_one_edit_per_mask_when_masks_outnumber_images(edit, server):
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1.0
    masks[1, :, 32:] = 1.0
    image = gradient_image()
    (edited,) = edit.edit(**edit_args(server, image, mask=masks))
    assert_comfy_image(edited, 2, 64, 64)
    change = (edited - image).abs().mean(dim=-1)
    assert change[0, :, :32].mean() > 5 * change[0, :, 32:].mean()
    assert change[1, :, 32:].mean() > 5 * change[1, :, :32].mean()


def test_edit_without_a_mask_and_with_sizes(edit, server):
    image = gradient_image(height=80, width=100)
    unicode = "un phare à l'aube, 灯台"  # a multipart text field, in UTF-8
    (auto,) = edit.edit(**edit_args(server, image, strength=0.0, prompt=unicode))  # 96x80
    assert_comfy_image(auto, 1, 80, 96)
    (sized,) = edit.edit(**edit_args(server, image, width=64, height=48, seed=SEED_MAX))
    assert_comfy_image(sized, 1, 48, 64)
    (again,) = edit.edit(**edit_args(server, image, width=64, height=48, seed=SEED_MAX))
    assert torch.equal(sized, again)
    with pytest.raises(ValueError, match="both"):
        edit.edit(**edit_args(server, image, width=64, height=0))


def test_edit_errors_carry_the_servers_message(package, edit, server):
    with pytest.raises(package.client.ServerError) as raised:
        edit.edit(**edit_args(server, gradient_image(), width=64, height=40))
    assert raised.value.status == 400 and "multiples of 16" in str(raised.value)


# Cancelling: ComfyUI's cancel button withdraws the request from the server.


def cancelled_requests(server: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:image_requests_total{") and 'outcome="cancelled"' in line
    )


def test_comfyuis_cancel_withdraws_the_request(package, generate, server, monkeypatch):
    class InterruptProcessingException(Exception):  # noqa: N818  (ComfyUI's name)
        pass

    interrupted = threading.Event()

    def throw_exception_if_processing_interrupted() -> None:
        if interrupted.is_set():
            interrupted.clear()
            raise InterruptProcessingException()

    fake = types.ModuleType("comfy.model_management")
    fake.processing_interrupted = interrupted.is_set  # type: ignore[attr-defined]
    fake.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "comfy.model_management", fake)
    before = cancelled_requests(server)
    threading.Timer(1.0, interrupted.set).start()
    started = time.monotonic()
    with pytest.raises(InterruptProcessingException):
        generate.generate(**generate_args(server, width=512, height=512, steps=200))
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 30
    while cancelled_requests(server) == before:
        assert time.monotonic() < deadline, "the server never withdrew the request"
        time.sleep(0.1)
    (images,) = generate.generate(**generate_args(server))  # and it serves on
    assert_comfy_image(images, 1, 64, 64)


# The model picker: the default server's /v1/models as a combo, and lora_scale.


def served_names(server: str) -> list[str]:
    response = httpx.get(f"{server}/v1/models", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return [card["id"] for card in response.json()["data"]]


def model_input(node: Any) -> tuple[list[str], dict]:
    choices, options = node.INPUT_TYPES()["optional"]["model"]
    return choices, options


def test_the_model_picker_lists_the_default_servers_models(package, server, monkeypatch):
    """As ComfyUI builds the widgets (page load, "refresh node definitions"): the combo holds
    "(server default)", then every name the server at $COMFYUI_VLLM_IMAGES_URL serves,
    listed with the key from ComfyUI's environment; new nodes point at that server."""
    monkeypatch.setenv("COMFYUI_VLLM_IMAGES_URL", server)
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    names = served_names(server)
    assert names == [*SERVED_NAMES, *ADAPTERS]  # the base model's names, then the adapters
    for node in map(package.NODE_CLASS_MAPPINGS.get, IMAGE_NODES):
        choices, options = model_input(node)
        assert choices == ["(server default)", *names]
        assert options["default"] == "(server default)"
        assert node.INPUT_TYPES()["required"]["server_url"][1]["default"] == server
    # The LoRA node offers the adapters alone: the cards whose parent is the base model.
    assert lora_name_choices(package) == list(ADAPTERS)


@pytest.mark.parametrize("reason", ["unreachable", "wrong key"])
def test_the_model_picker_offers_the_server_default_when_the_list_fails(
    package, server, monkeypatch, caplog, reason
):
    """A server that is down (or refuses the key) leaves a combo of "(server default)" alone,
    at once, without an exception (ComfyUI would drop the node), and one warning in the log."""
    url = f"http://127.0.0.1:{free_port()}" if reason == "unreachable" else server
    monkeypatch.setenv("COMFYUI_VLLM_IMAGES_URL", url)
    monkeypatch.setenv("VLLM_API_KEY", "wrong")
    monkeypatch.setattr(package.model_list, "MODELS", package.model_list.ModelList())
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    for node in map(package.NODE_CLASS_MAPPINGS.get, IMAGE_NODES):
        choices, options = model_input(node)
        assert choices == ["(server default)"] and options["default"] == "(server default)"
    assert lora_name_choices(package) == ["(no adapter listed)"]
    assert time.monotonic() - started < package.model_list.LIST_TIMEOUT_S
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and f"cannot list the models of {url}" in warnings[0], warnings


def test_the_model_list_is_cached_briefly_and_follows_the_configured_server(package, monkeypatch):
    """One page load or queued prompt calls INPUT_TYPES for each node and more: one lookup
    serves them all for a few seconds, failures included; a refresh after that asks again."""
    model_list = package.model_list
    calls: list[tuple[str, str]] = []
    answers: list[list | Exception] = [
        [model_list.ServedModel("base"), model_list.ServedModel("style", parent="base")],
        package.client.ServerError("Cannot reach the vLLM server"),
        [model_list.ServedModel("base")],
    ]

    def fetch(base_url: str, api_key: str) -> list:
        calls.append((base_url, api_key))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    now = [0.0]
    models = model_list.ModelList(fetch, ttl_s=5.0, clock=lambda: now[0])
    monkeypatch.setenv("COMFYUI_VLLM_IMAGES_URL", "http://gpu-box:8000")
    monkeypatch.setenv("VLLM_API_KEY", "k")
    assert models.choices() == ["(server default)", "base", "style"]
    now[0] = 4.9
    assert models.choices() == ["(server default)", "base", "style"]
    assert models.adapters() == ["style"]
    assert calls == [("http://gpu-box:8000", "k")]
    now[0] = 5.0
    assert models.choices() == ["(server default)"]  # the failure, cached too
    now[0] = 9.0
    assert models.choices() == ["(server default)"] and len(calls) == 2
    monkeypatch.setenv("COMFYUI_VLLM_IMAGES_URL", "http://other:8000")  # another server
    assert models.choices() == ["(server default)", "base"]
    assert models.adapters() == ["(no adapter listed)"]
    assert calls[-1] == ("http://other:8000", "k")


def test_validate_inputs_lets_any_model_name_through(package):
    """ComfyUI refuses a combo value its list lacks unless VALIDATE_INPUTS names the input
    (execution.validate_inputs); it must take only `model` (a **kwargs would switch off
    ComfyUI's checks of every other input), with a default for workflows without it."""
    for node in map(package.NODE_CLASS_MAPPINGS.get, IMAGE_NODES):
        spec = inspect.getfullargspec(node.VALIDATE_INPUTS)
        assert spec.args[1:] == ["model"] and spec.varkw is None
        assert node.VALIDATE_INPUTS() is True
        for name in ("(server default)", "", "tiny-qwen-image", "an-adapter-not-loaded-now"):
            assert node.VALIDATE_INPUTS(model=name) is True
        assert node.VALIDATE_INPUTS(model=None) is True  # a linked input, not yet run
        assert isinstance(node.VALIDATE_INPUTS(model=3), str)


def test_the_fields_send_model_and_lora_scale_only_when_chosen(package):
    fields = package.nodes._fields
    for default in ("(server default)", "", "  "):
        assert "model" not in fields("p", "", 0, 4.0, default)
    assert fields("p", "", 0, 4.0, " style ")["model"] == "style"
    assert "lora_scale" not in fields("p", "", 0, 4.0, "style", 1.0)
    assert fields("p", "", 0, 4.0, "style", 0.6)["lora_scale"] == 0.6
    assert fields("p", "", 0, 4.0, "(server default)", 0.0)["lora_scale"] == 0.0
    for no_stack in (None, ()):
        assert "lora" not in fields("p", "", 0, 4.0, "style", 1.0, no_stack)
    stack = (("style", 0.8), ("character", -0.5))
    assert fields("p", "", 0, 4.0, "", 1.0, stack)["lora"] == [
        {"name": "style", "scale": 0.8},
        {"name": "character", "scale": -0.5},
    ]


def test_the_picked_model_is_sent_and_an_unknown_name_raises_the_servers_404(
    package, generate, server
):
    (default,) = generate.generate(**generate_args(server, model="(server default)"))
    (named,) = generate.generate(**generate_args(server, model="tiny-qwen-image"))
    (legacy,) = generate.generate(**generate_args(server, model=""))
    assert torch.equal(default, named) and torch.equal(default, legacy)
    (styled,) = generate.generate(**generate_args(server, model="style"))
    assert float((styled - default).abs().max()) > 10 / 255
    with pytest.raises(package.client.ServerError) as raised:
        generate.generate(**generate_args(server, model="no-such-adapter"))
    assert raised.value.status == 404
    assert "no-such-adapter" in str(raised.value) and "does not exist" in str(raised.value)


def test_lora_scale_is_sent_unless_1_and_refused_without_an_adapter(
    package, generate, edit, server
):
    (images,) = generate.generate(**generate_args(server, lora_scale=1.0))  # not sent
    assert_comfy_image(images, 1, 64, 64)
    with pytest.raises(package.client.ServerError) as raised:
        generate.generate(**generate_args(server, lora_scale=0.5))
    assert raised.value.status == 400 and "lora_scale" in str(raised.value)
    with pytest.raises(package.client.ServerError) as raised:  # the edit's form field
        edit.edit(**edit_args(server, gradient_image(), lora_scale=0.5))
    assert raised.value.status == 400 and "lora_scale" in str(raised.value)
    (base,) = generate.generate(**generate_args(server))
    (full,) = generate.generate(**generate_args(server, model="style", lora_scale=1.0))
    (half,) = generate.generate(**generate_args(server, model="style", lora_scale=0.5))
    (off,) = generate.generate(**generate_args(server, model="style", lora_scale=0.0))
    assert float((off - base).abs().max()) <= 2 / 255  # strength 0: the base model
    assert float((half - full).abs().max()) > 2 / 255 and float((half - base).abs().max()) > 2 / 255


# The LoRA node: a stack of the server's adapters, sent as the request's lora list.


def lora_name_choices(package: types.ModuleType) -> list[str]:
    node = package.NODE_CLASS_MAPPINGS["VLLMImageLoRA"]
    choices: list[str] = node.INPUT_TYPES()["required"]["lora_name"][0]
    return choices


def test_lora_nodes_chain_into_a_stack(package, lora):
    (first,) = lora.stack("style", 0.8)
    (both,) = lora.stack(" character ", 0.6, lora_stack=first)
    assert first == (("style", 0.8),)  # the incoming stack is not changed
    assert both == (("style", 0.8), ("character", 0.6))
    assert lora.stack("character", 0.0, lora_stack=first) == (first,)  # 0: left out
    assert lora.stack("style", 0.0) == ((),)
    with pytest.raises(ValueError, match="No LoRA adapter chosen"):
        lora.stack("(no adapter listed)", 1.0)  # a linked name: judged when the node runs


def test_the_lora_nodes_validate_inputs_refuses_only_the_placeholder(package):
    node = package.NODE_CLASS_MAPPINGS["VLLMImageLoRA"]
    spec = inspect.getfullargspec(node.VALIDATE_INPUTS)
    assert spec.args[1:] == ["lora_name"] and spec.varkw is None
    for name in ("style", "an-adapter-not-loaded-now", None):
        assert node.VALIDATE_INPUTS(lora_name=name) is True
    for bad in ("(no adapter listed)", " ", 3):
        assert isinstance(node.VALIDATE_INPUTS(lora_name=bad), str), bad


def direct_image(server: str, route: str, form: dict[str, Any], png: bytes | None = None):
    """The server's image for `form`, asked for directly: a JSON generation, or a multipart
    edit of `png`; as a ComfyUI IMAGE `[H, W, 3]`."""
    url = f"{server}/v1/images/{route}"
    if png is None:
        response = httpx.post(url, json=form, headers=AUTH, timeout=120)
    else:
        data = {name: str(value) for name, value in form.items()}
        files = {"image": ("image.png", png, "image/png")}
        response = httpx.post(url, data=data, files=files, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    image = decode_image_base64(response.json()["data"][0]["b64_json"]).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def test_a_stack_of_lora_nodes_gives_the_image_of_the_same_lora_list(
    package, lora, generate, edit, server
):
    """Two chained LoRA nodes into each image node: the image the same `lora` list gives
    through a direct API call (a JSON list in a generation, JSON text in an edit's form),
    which is neither adapter's image alone (checked on the generation, the quicker)."""
    (stack,) = lora.stack("character", 0.6, lora_stack=lora.stack("style", 0.8)[0])
    listed = [{"name": "style", "scale": 0.8}, {"name": "character", "scale": 0.6}]
    image = gradient_image()
    png = package.nodes.image_to_png(image[0])
    common = {"prompt": "a lighthouse at dawn", "seed": 7, "num_inference_steps": STEPS}
    (generated,) = generate.generate(**generate_args(server, lora_stack=stack))
    (edited,) = edit.edit(**edit_args(server, image, lora_stack=stack))
    for got, route, form, source in (
        (generated, "generations", {**common, "size": "64x64"}, None),
        (edited, "edits", {**common, "size": "auto", "strength": 1.0}, png),
    ):
        for adapters in (listed, listed[:1], listed[1:]) if source is None else (listed,):
            lora_value = adapters if source is None else json.dumps(adapters)
            direct = direct_image(server, route, {**form, "lora": lora_value}, source)
            if adapters is listed:
                assert_same_images(got[0], direct)
            else:  # one adapter alone: another image
                assert float((got[0] - direct).abs().max()) > 2 / 255, (route, adapters)
