"""Real, headless ComfyUI runs the sample workflow against the live server (opt-in).

Skipped unless `COMFYUI_DIR` points at a ComfyUI checkout and `COMFYUI_PYTHON` (default: this
interpreter) can import ComfyUI's requirements:

    COMFYUI_DIR=~/ComfyUI COMFYUI_PYTHON=~/comfyui-venv/bin/python \\
        HF_HUB_OFFLINE=1 .venv/bin/pytest tests/e2e/test_comfyui_real.py -q -s

The checkout is not modified: ComfyUI runs with `--base-directory` set to a temporary folder
(its `custom_nodes/` holds a copy of the package; models, input, output, temp and user
folders live there too), an in-memory database, and no bytecode written.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from testing.server_process import free_port

from .live_server import ADAPTERS, API_KEY, AUTH

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
EXAMPLES = Path(__file__).parents[2] / "examples" / "comfyui"
PACKAGE_DIR = EXAMPLES / "comfyui_vllm_images"
WORKFLOW = EXAMPLES / "vllm_image_workflow.json"
OUR_NODES = ("VLLMImageGenerate", "VLLMImageEdit")
"""The image nodes; "VLLMImageLoRA" builds the stack of adapters they take."""
# What ComfyUI imports at start-up (its requirements.txt, and `requests`, which its server
# imports without listing it).
COMFYUI_MODULES = (
    "torch", "torchvision", "torchsde", "numpy", "einops", "transformers", "safetensors",
    "aiohttp", "yarl", "yaml", "PIL", "scipy", "tqdm", "psutil", "alembic", "sqlalchemy", "av",
    "comfyui_frontend_package", "requests",
)  # fmt: skip
STARTUP_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 900.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout"),
]


@dataclass(frozen=True)
class ComfyUI:
    url: str
    base_dir: Path
    log: Path


def missing_requirements() -> str:
    check = subprocess.run(
        [COMFYUI_PYTHON, "-c", f"import {', '.join(COMFYUI_MODULES)}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return "" if check.returncode == 0 else (check.stderr.strip().splitlines() or ["?"])[-1]


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory: pytest.TempPathFactory, server: str) -> Iterator[ComfyUI]:
    checkout = Path(COMFYUI_DIR).expanduser().resolve()
    if not (checkout / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR} is not a ComfyUI checkout (no main.py)")
    missing = missing_requirements()
    if missing:
        pytest.skip(f"{COMFYUI_PYTHON} cannot import ComfyUI's requirements: {missing}")
    base_dir = tmp_path_factory.mktemp("comfyui-base")
    shutil.copytree(
        PACKAGE_DIR,
        base_dir / "custom_nodes" / PACKAGE_DIR.name,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    port = free_port()
    log = base_dir / "comfyui.log"
    command = [
        COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base_dir), "--database-url", "sqlite:///:memory:",
        "--disable-api-nodes", "--disable-auto-launch",
    ]  # fmt: skip
    # The key comes from the environment, as the package README recommends, so that it is
    # saved neither in the workflow nor in the PNGs; the model picker lists that server.
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "VLLM_API_KEY": API_KEY,
        "COMFYUI_VLLM_IMAGES_URL": server,
    }
    env.pop("OPENAI_API_KEY", None)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=checkout, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/system_stats", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"ComfyUI did not start:\n{log.read_text()}")
            time.sleep(0.5)
        print(f"\nComfyUI started in {time.monotonic() - started:.1f} s ({url})")
        yield ComfyUI(url, base_dir, log)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sample_workflow(server: str) -> dict[str, Any]:
    workflow: dict[str, Any] = json.loads(WORKFLOW.read_text())
    for node in workflow.values():
        if node["class_type"] in OUR_NODES:
            node["inputs"]["server_url"] = server
    return workflow


def queue(comfyui: ComfyUI, workflow: dict[str, Any]) -> str:
    response = httpx.post(
        f"{comfyui.url}/prompt",
        json={"prompt": workflow, "client_id": uuid.uuid4().hex},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    prompt_id: str = response.json()["prompt_id"]
    return prompt_id


def wait_for(comfyui: ComfyUI, prompt_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        history = httpx.get(f"{comfyui.url}/history/{prompt_id}", timeout=30).json()
        entry: dict[str, Any] | None = history.get(prompt_id)
        if entry is not None:  # ComfyUI records a prompt in its history once it has run
            return entry
        assert time.monotonic() < deadline, f"no result in time:\n{comfyui.log.read_text()}"
        time.sleep(0.5)


def saved_images(comfyui: ComfyUI, entry: dict[str, Any], node_id: str) -> list[Path]:
    paths = []
    for image in entry["outputs"][node_id]["images"]:
        assert image["type"] == "output"
        path = comfyui.base_dir / "output" / image["subfolder"] / image["filename"]
        assert path.is_file(), path
        paths.append(path)
    return paths


def combo_options(spec: list[Any]) -> list[str]:
    """A combo input's entries as /object_info shows them: `[[...], {...}]`, or
    `["COMBO", {"options": [...]}]` where ComfyUI converts V1 combos."""
    options: list[str] = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    return options


def test_comfyui_loads_the_package_and_lists_its_nodes(comfyui, server):
    info = httpx.get(f"{comfyui.url}/object_info", timeout=60).json()
    assert info["VLLMImageGenerate"]["display_name"] == "vLLM Image Generate"
    assert info["VLLMImageEdit"]["display_name"] == "vLLM Image Edit"
    for name in OUR_NODES:
        assert info[name]["python_module"] == "custom_nodes.comfyui_vllm_images"
        assert info[name]["output"] == ["IMAGE"]
        seed = info[name]["input"]["required"]["seed"][1]
        assert seed["max"] == 2**64 - 1 and seed["control_after_generate"] is True
    assert info["VLLMImageEdit"]["input"]["optional"]["mask"][0] == "MASK"
    served = httpx.get(f"{server}/v1/models", headers=AUTH, timeout=30).json()["data"]
    for name in OUR_NODES:
        optional = info[name]["input"]["optional"]
        assert "style" in [card["id"] for card in served]  # the server's adapter is offered
        assert combo_options(optional["model"]) == [
            "(server default)",
            *(card["id"] for card in served),
        ]
        assert optional["lora_scale"][0] == "FLOAT"
        assert optional["lora_stack"][0] == "VLLM_LORA_STACK"
    lora = info["VLLMImageLoRA"]
    assert lora["display_name"] == "vLLM Image LoRA" and lora["output"] == ["VLLM_LORA_STACK"]
    assert lora["input"]["optional"]["lora_stack"][0] == "VLLM_LORA_STACK"  # it chains
    adapters = [card["id"] for card in served if card.get("parent")]
    assert adapters == list(ADAPTERS)
    assert combo_options(lora["input"]["required"]["lora_name"]) == adapters
    log = comfyui.log.read_text()
    assert "comfyui_vllm_images" in log and "IMPORT FAILED" not in log


def test_comfyui_runs_the_sample_workflow(comfyui, server):
    workflow = sample_workflow(server)
    started = time.monotonic()
    entry = wait_for(comfyui, queue(comfyui, workflow))
    print(f"sample workflow ran in {time.monotonic() - started:.1f} s: {entry['status']}")
    assert entry["status"]["status_str"] == "success", entry["status"]
    generate = workflow["1"]["inputs"]
    size = (generate["width"], generate["height"])
    (generated_path,) = saved_images(comfyui, entry, "2")
    (edited_path,) = saved_images(comfyui, entry, "7")
    with Image.open(generated_path) as generated, Image.open(edited_path) as edited:
        assert generated.size == size and edited.size == size
        # The key came from ComfyUI's environment: the saved workflow does not hold it.
        assert API_KEY not in json.dumps(generated.info) + json.dumps(edited.info)
        assert json.loads(generated.info["prompt"])["1"]["class_type"] == "VLLMImageGenerate"
        before = np.asarray(generated.convert("RGB"), dtype=np.float32) / 255
        after = np.asarray(edited.convert("RGB"), dtype=np.float32) / 255
    # The mask (MaskComposite of two SolidMasks) is the centre square: it changed, the rest
    # did not (much).
    mask = workflow["5"]["inputs"]
    side = workflow["4"]["inputs"]["width"]
    top, left = mask["y"], mask["x"]
    change = np.abs(after - before).mean(axis=-1)
    inside = change[top : top + side, left : left + side].mean()
    outside_mask = np.ones_like(change, dtype=bool)
    outside_mask[top : top + side, left : left + side] = False
    outside = change[outside_mask].mean()
    print(f"edit: mean change inside the mask {inside:.3f}, outside {outside:.3f}")
    assert inside > 5 * outside


def test_a_server_error_shows_on_the_node_with_the_servers_message(comfyui, server):
    workflow = sample_workflow(server)
    workflow["1"]["inputs"]["width"] = 1000  # not a multiple of 16: the server refuses it
    body = {"prompt": "x", "size": "1000x1024"}
    direct = httpx.post(f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=60)
    message = direct.json()["error"]["message"]
    entry = wait_for(comfyui, queue(comfyui, workflow))
    assert entry["status"]["status_str"] == "error"
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1
    assert errors[0]["node_id"] == "1" and errors[0]["node_type"] == "VLLMImageGenerate"
    assert errors[0]["exception_type"].endswith("ServerError")
    assert errors[0]["exception_message"].strip() == message  # ComfyUI appends a newline
    assert API_KEY not in json.dumps(errors[0])  # the node's inputs are in the error too


def test_a_model_name_the_list_lacks_passes_validation_and_the_server_judges_it(comfyui, server):
    """A saved workflow whose adapter is not listed (not loaded now, another server): ComfyUI
    queues it (the nodes' VALIDATE_INPUTS takes any name, so no "Value not in list") and the
    node fails with the server's own message."""
    workflow = sample_workflow(server)
    workflow["1"]["inputs"]["model"] = "no-such-adapter"
    body = {"prompt": "x", "size": "64x64", "model": "no-such-adapter"}
    direct = httpx.post(f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=60)
    assert direct.status_code == 404
    entry = wait_for(comfyui, queue(comfyui, workflow))  # queue() asserts a 200
    assert entry["status"]["status_str"] == "error"
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_id"] == "1"
    assert errors[0]["exception_message"].strip() == direct.json()["error"]["message"]


def test_chained_lora_nodes_send_their_stack_as_the_apis_lora_list(comfyui, server):
    """Two vLLM Image LoRA nodes chained into the generate node: ComfyUI validates, links and
    runs them, and the saved image is the one the same `lora` list gives through a direct
    API call, not one adapter's alone."""
    knobs = {"prompt": "a lighthouse at dawn", "seed": 5, "num_inference_steps": 2}
    workflow = {
        "1": {"class_type": "VLLMImageLoRA", "inputs": {"lora_name": "style", "strength": 0.8}},
        "2": {"class_type": "VLLMImageLoRA",
              "inputs": {"lora_name": "character", "strength": 0.6, "lora_stack": ["1", 0]}},
        "3": {"class_type": "VLLMImageGenerate",
              "inputs": {"server_url": server, "prompt": knobs["prompt"], "negative_prompt": "",
                         "width": 64, "height": 64, "steps": 2, "true_cfg_scale": 4.0,
                         "seed": 5, "batch_size": 1, "model": "(server default)",
                         "lora_scale": 1.0, "lora_stack": ["2", 0]}},
        "4": {"class_type": "SaveImage",
              "inputs": {"images": ["3", 0], "filename_prefix": "vllm_lora_stack"}},
    }  # fmt: skip
    entry = wait_for(comfyui, queue(comfyui, workflow))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (path,) = saved_images(comfyui, entry, "4")
    with Image.open(path) as saved:
        got = np.asarray(saved.convert("RGB"), dtype=int)

    def direct(lora: list[dict[str, Any]]) -> np.ndarray:
        body = {**knobs, "size": "64x64", "lora": lora}
        response = httpx.post(
            f"{server}/v1/images/generations", json=body, headers=AUTH, timeout=120
        )
        assert response.status_code == 200, response.text
        png = base64.b64decode(response.json()["data"][0]["b64_json"])
        with Image.open(io.BytesIO(png)) as image:
            return np.asarray(image.convert("RGB"), dtype=int)

    listed = [{"name": "style", "scale": 0.8}, {"name": "character", "scale": 0.6}]
    # SaveImage truncates ComfyUI's floats to 8 bits: within 1 of the server's PNG.
    assert int(np.abs(got - direct(listed)).max()) <= 1
    assert int(np.abs(got - direct(listed[:1])).max()) > 2


def server_metric(server: str, name: str, label: str = "") -> float:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"{name}{{") and label in line
    )


def cancelled_requests(server: str) -> float:
    return server_metric(server, "vllm:image_requests_total", 'outcome="cancelled"')


def test_comfyuis_cancel_stops_the_node_and_the_server_withdraws_the_request(comfyui, server):
    workflow = sample_workflow(server)
    workflow["1"]["inputs"]["steps"] = 200  # a minute or more on a CPU
    before = cancelled_requests(server)
    prompt_id = queue(comfyui, workflow)
    deadline = time.monotonic() + 60
    while server_metric(server, "vllm:image_running_images") == 0:
        assert time.monotonic() < deadline, "the request never started on the server"
        time.sleep(0.2)
    started = time.monotonic()
    assert httpx.post(f"{comfyui.url}/interrupt", timeout=30).status_code == 200
    entry = wait_for(comfyui, prompt_id)
    stopped_after = time.monotonic() - started
    print(f"cancel: ComfyUI stopped the run {stopped_after:.1f} s after /interrupt")
    assert stopped_after < 10
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, entry["status"]
    deadline = time.monotonic() + 30
    while cancelled_requests(server) == before:
        assert time.monotonic() < deadline, "the server never withdrew the request"
        time.sleep(0.1)
