"""`examples/api_server/image_generation_client.py` run as a user runs it, against the live
`vllm serve tiny-qwen-image --task image --api-key ...` server."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai.types import Model
from PIL import Image

from testing.server_process import free_port
from tests.support.images import FAST_STEPS

from .live_server import ADAPTERS, API_KEY, AUTH

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CLIENT = "examples/api_server/image_generation_client.py"
FAST = ("--steps", str(FAST_STEPS["num_inference_steps"]))


def run_client(
    server: str,
    *args: str | Path,
    api_key: str | None = API_KEY,
    env_key: str | None = None,
    base_url: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The client as a subprocess: `--base-url` the live server's /v1 URL unless `base_url`,
    `--api-key` unless None; `OPENAI_API_KEY` is `env_key` (unset when None)."""
    env = {name: value for name, value in os.environ.items() if name != "OPENAI_API_KEY"}
    if env_key is not None:
        env["OPENAI_API_KEY"] = env_key
    base_url = f"{server}/v1" if base_url is None else base_url
    command = [sys.executable, CLIENT, "--base-url", base_url, *map(str, args)]
    if api_key is not None:
        command += ["--api-key", api_key]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_writes_a_png_of_the_asked_size(server, tmp_path):
    output = tmp_path / "lighthouse.png"
    fields = ("--prompt", "a lighthouse", "--size", "128x64", *FAST, "--output", output)
    stdout = succeeded(run_client(server, *fields))
    assert f"wrote {output}" in stdout
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (128, 64)
        assert np.asarray(image).std() > 0  # an image, not a blank canvas


def test_n_3_writes_three_different_images_named_after_the_output(server, tmp_path):
    output = tmp_path / "dragon.png"
    fields = ("--prompt", "a dragon", "--size", "64x64", "--seed", "11", *FAST)
    stdout = succeeded(run_client(server, *fields, "--n", "3", "--output", output))
    paths = [output, tmp_path / "dragon_1.png", tmp_path / "dragon_2.png"]
    assert sorted(tmp_path.iterdir()) == sorted(paths)
    assert stdout.splitlines() == [f"wrote {path}" for path in paths]
    images = [pixels(path) for path in paths]
    assert all(image.shape == (64, 64, 3) for image in images)
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[1], images[2])
    assert not np.array_equal(images[0], images[2])


def test_the_same_seed_gives_the_same_image_and_another_seed_another(server, tmp_path):
    fields = ("--prompt", "a boat", "--size", "64x64", *FAST)
    first, second, other = tmp_path / "first.png", tmp_path / "second.png", tmp_path / "other.png"
    succeeded(run_client(server, *fields, "--seed", "7", "--output", first))
    succeeded(run_client(server, *fields, "--seed", "7", "--output", second))
    succeeded(run_client(server, *fields, "--seed", "8", "--output", other))
    assert first.read_bytes() == second.read_bytes()
    assert not np.array_equal(pixels(first), pixels(other))


def test_a_webp_output_asks_the_server_for_webp(server, tmp_path):
    output = tmp_path / "boat.webp"
    succeeded(
        run_client(server, "--prompt", "a boat", "--size", "64x64", *FAST, "--output", output)
    )
    with Image.open(output) as image:
        assert image.format == "WEBP" and image.size == (64, 64)


def write_input_and_mask(folder: Path) -> tuple[Path, Path]:
    """A flat blue 64x48 image, and a mask whose left half is transparent (to be edited)."""
    image, mask = folder / "in.png", folder / "mask.png"
    Image.new("RGB", (64, 48), (30, 60, 150)).save(image)
    transparent_left = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    transparent_left.paste((0, 0, 0, 0), (0, 0, 32, 48))
    transparent_left.save(mask)
    return image, mask


def test_image_and_mask_edit_the_input_at_its_size(server, tmp_path):
    image, mask = write_input_and_mask(tmp_path)
    output = tmp_path / "fox.png"
    fields = ("--prompt", "a red fox", "--seed", "2", *FAST, "--output", output)
    stdout = succeeded(run_client(server, *fields, "--image", image, "--mask", mask))
    assert f"wrote {output}" in stdout
    with Image.open(output) as edited:
        assert edited.format == "PNG" and edited.size == (64, 48)
    kept = pixels(output)[:, 33:].astype(int)  # the mask's opaque half is kept as it was
    assert np.abs(kept - (30, 60, 150)).mean() < 1
    assert np.abs(pixels(output)[:, :31].astype(int) - (30, 60, 150)).mean() > 1


@pytest.mark.parametrize("edit", [False, True], ids=["generation", "edit"])
def test_stream_prints_each_partial_image_then_saves_the_final_one(server, tmp_path, edit):
    image, _ = write_input_and_mask(tmp_path)
    # 4 steps leave room for 2 previews (after steps 1 and 3); strength 1 runs all 4 in an edit
    inputs = ("--image", image, "--strength", "1") if edit else ("--size", "64x48")
    fields = ("--prompt", "a lighthouse", "--seed", "9", "--steps", "4", *inputs)
    streamed, plain = tmp_path / "streamed.png", tmp_path / "plain.png"
    stdout = succeeded(run_client(server, *fields, "--stream", "--output", streamed))
    lines = stdout.splitlines()
    assert [line.split(" (")[0] for line in lines[:3]] == [
        "partial image 1/2",
        "partial image 2/2",
        "image completed",
    ]
    assert "(64x48)" in lines[0]
    assert lines[3:] == [f"wrote {streamed}"]
    succeeded(run_client(server, *fields, "--output", plain))
    assert streamed.read_bytes() == plain.read_bytes()  # the stream's image is the request's


def test_the_key_comes_from_openai_api_key_when_not_given(server, tmp_path):
    output = tmp_path / "env.png"
    fields = ("--prompt", "a boat", "--size", "64x64", *FAST, "--output", output)
    succeeded(run_client(server, *fields, api_key=None, env_key=API_KEY))
    with Image.open(output) as image:
        assert image.size == (64, 64)
    denied = run_client(server, *fields, api_key=None, env_key=None)  # "EMPTY": refused
    assert denied.returncode == 1
    assert "401: Unauthorized" in denied.stderr


def test_a_wrong_key_exits_1_with_the_servers_message(server, tmp_path):
    output = tmp_path / "never.png"
    fields = ("--prompt", "a boat", "--size", "64x64", "--output", output)
    result = run_client(server, *fields, api_key="wrong", env_key=API_KEY)  # the flag wins
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: 401: Unauthorized (check --api-key or OPENAI_API_KEY)")
    assert result.stdout == "" and not output.exists()


def test_a_size_the_server_refuses_exits_1_with_its_message(server, tmp_path):
    output = tmp_path / "never.png"
    fields = ("--prompt", "a boat", "--output", output)
    banana = run_client(server, *fields, "--size", "banana")
    assert banana.returncode == 1
    assert banana.stderr.startswith("error: 400: ")
    assert "size must be 'WIDTHxHEIGHT'" in banana.stderr
    assert "Traceback" not in banana.stderr
    odd = run_client(server, *fields, "--size", "250x250")
    assert odd.returncode == 1
    assert "multiples of 16" in odd.stderr
    assert not output.exists()


def test_a_server_that_is_not_there_exits_1_saying_so(tmp_path):
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    output = tmp_path / "never.png"
    result = subprocess.run(
        [sys.executable, CLIENT, "--prompt", "a boat", "--base-url", base_url, "--output", output],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach {base_url}: Connection error.")
    assert not output.exists()


def test_the_servers_root_is_taken_and_another_path_says_what_to_pass(server, tmp_path):
    """`--base-url http://host:8000`, as vLLM's own examples and ComfyUI nodes take a server,
    reaches its API; a URL whose path is not the API says what to pass, not a bare 404."""
    output = tmp_path / "root.png"
    fields = ("--prompt", "a boat", "--size", "64x64", *FAST, "--output", output)
    succeeded(run_client(server, *fields, base_url=server))
    with Image.open(output) as image:
        assert image.size == (64, 64)
    output.unlink()
    wrong = run_client(server, *fields, base_url=f"{server}/api")
    assert wrong.returncode == 1 and not output.exists()
    assert wrong.stderr.startswith(f"error: 404: Not Found ({server}/api/models does not exist")
    assert f"pass the server's root, --base-url {server}, or its /v1 URL, {server}/v1" in (
        wrong.stderr
    )


def test_a_server_root_gets_v1_and_other_urls_are_kept():
    client = load_client()
    for given, used in [
        ("http://gpu-box:8000", "http://gpu-box:8000/v1"),
        ("http://gpu-box:8000/", "http://gpu-box:8000/v1"),
        ("http://gpu-box:8000/v1", "http://gpu-box:8000/v1"),
        ("https://proxy.example/images/v1", "https://proxy.example/images/v1"),
    ]:
        assert client.api_url(given) == used


def load_client() -> types.ModuleType:
    """The client as a module (it is a script, not a package), for its pure functions."""
    spec = importlib.util.spec_from_file_location("image_generation_client", REPO / CLIENT)
    assert spec is not None and spec.loader is not None
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    return client


def served_models(server: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server}/v1/models", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    cards: list[dict[str, Any]] = response.json()["data"]
    return cards


def test_list_models_prints_each_model_and_each_adapters_base(server):
    cards = served_models(server)
    assert cards[0]["id"] == "tiny-qwen-image" and not cards[0].get("parent")
    expected = [
        card["id"] if not card.get("parent") else f"{card['id']} (LoRA adapter of {card['parent']})"
        for card in cards
    ]
    result = run_client(server, "--list-models")  # no --prompt needed
    assert succeeded(result).splitlines() == expected
    for adapter in ADAPTERS:  # the server's adapters
        assert f"{adapter} (LoRA adapter of tiny-qwen-image)" in expected
    assert result.stderr == ""


def test_list_models_lines_name_an_adapters_base_model():
    client = load_client()
    models = [
        Model.model_validate(card)
        for card in (
            {"id": "tiny-qwen-image", "object": "model", "created": 1, "owned_by": "vllm",
             "root": "/models/tiny", "parent": None},
            {"id": "style", "object": "model", "created": 1, "owned_by": "vllm",
             "root": "/adapters/style", "parent": "tiny-qwen-image"},
        )
    ]  # fmt: skip
    assert client.model_lines(models) == [
        "tiny-qwen-image",
        "style (LoRA adapter of tiny-qwen-image)",
    ]


def test_without_prompt_or_list_models_the_client_says_what_it_needs(tmp_path):
    result = subprocess.run(
        [sys.executable, CLIENT, "--output", tmp_path / "never.png"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2  # argparse's usage error
    assert "--prompt is required (unless --list-models)" in result.stderr


def test_model_picks_the_served_model_and_an_unknown_name_exits_1(server, tmp_path):
    fields = ("--prompt", "a boat", "--size", "64x64", "--seed", "5", *FAST)
    named, default = tmp_path / "named.png", tmp_path / "default.png"
    succeeded(run_client(server, *fields, "--model", "tiny-qwen-image", "--output", named))
    succeeded(run_client(server, *fields, "--output", default))
    assert named.read_bytes() == default.read_bytes()  # the base model's name is the default
    styled = tmp_path / "styled.png"
    succeeded(run_client(server, *fields, "--model", "style", "--output", styled))
    assert pixel_difference(styled, default) > 10  # the adapter's image
    unknown = run_client(server, *fields, "--model", "no-such-adapter", "--output", tmp_path / "x")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: 404: ")
    assert "no-such-adapter" in unknown.stderr and "does not exist" in unknown.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("edit", [False, True], ids=["generation", "edit"])
def test_lora_scale_is_sent_and_refused_without_an_adapter(server, tmp_path, edit):
    """`--lora-scale` reaches the server (in the JSON body, or the edit's form): with the base
    model the server refuses it with a 400 that names it, rather than ignore it."""
    image, _ = write_input_and_mask(tmp_path)
    inputs = ("--image", image) if edit else ("--size", "64x64")
    output = tmp_path / "never.png"
    fields = ("--prompt", "a boat", *inputs, *FAST, "--output", output)
    result = run_client(server, *fields, "--lora-scale", "0.5")
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("error: 400: ") and "lora_scale" in result.stderr
    assert not output.exists()
    if edit:
        return  # adapters on edits: tests/integration/test_lora.py
    # The client's images at strengths 0.5 and 0, against the server's own (fetched directly).
    body = {"prompt": "a boat", "size": "64x64", "seed": 3, **FAST_STEPS}
    base, full = (server_image(server, body, model) for model in ("tiny-qwen-image", "style"))
    for scale, expected in (("0.5", None), ("0", base)):
        output = tmp_path / f"scale-{scale}.png"
        fields = ("--prompt", "a boat", *inputs, *FAST, "--seed", "3", "--model", "style")
        succeeded(run_client(server, *fields, "--lora-scale", scale, "--output", output))
        got = np.asarray(Image.open(output).convert("RGB"), dtype=int)
        if expected is None:  # half strength: neither the base model nor the adapter's full
            assert min(int(np.abs(got - full).max()), int(np.abs(got - base).max())) > 2
        else:  # strength 0: the base model
            assert int(np.abs(got - expected).max()) <= 2


def pixel_difference(first: Path, second: Path) -> int:
    """The largest difference of one pixel's channel between two image files."""
    a, b = (np.asarray(Image.open(path).convert("RGB"), dtype=int) for path in (first, second))
    return int(np.abs(a - b).max())


def server_image(server: str, body: dict[str, Any], model: str) -> np.ndarray:
    """The server's image for `body` with `model`, asked for directly (not by the client)."""
    response = httpx.post(
        f"{server}/v1/images/generations", json={**body, "model": model}, headers=AUTH, timeout=60
    )
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)


def test_lora_takes_a_name_and_a_scale_and_repeats(capsys):
    client = load_client()
    args = client.parse_args(
        ["--prompt", "x", "--lora", "style", "--lora", "character:0.6", "--lora", " ink :-1e-1"]
    )
    assert args.lora == [
        {"name": "style"},  # the server's default scale, 1.0
        {"name": "character", "scale": 0.6},
        {"name": "ink", "scale": -0.1},
    ]
    assert client.parse_args(["--prompt", "x"]).lora is None  # no lora field sent
    for bad in (":0.5", "style:", "style:strong"):
        with pytest.raises(SystemExit) as usage_error:
            client.parse_args(["--prompt", "x", "--lora", bad])
        assert usage_error.value.code == 2
        assert "--lora" in capsys.readouterr().err


STACK = [{"name": "style", "scale": 0.8}, {"name": "character", "scale": 0.6}]
"""The two adapters of the shared server, each at its own strength."""


@pytest.mark.parametrize("edit", [False, True], ids=["generation", "edit"])
def test_repeated_lora_sends_the_stack_as_the_apis_lora_list(server, tmp_path, edit):
    """`--lora style:0.8 --lora character:0.6` gives the image the same `lora` list gives
    through a direct API call (a JSON list in a generation's body, JSON text in an edit's
    form), which is neither adapter's image alone (checked on the generation, the quicker)."""
    image, _ = write_input_and_mask(tmp_path)
    inputs = ("--image", image, "--strength", "1") if edit else ("--size", "64x64")
    output = tmp_path / "stacked.png"
    fields = ("--prompt", "a boat", *inputs, *FAST, "--seed", "3", "--output", output)
    succeeded(run_client(server, *fields, "--lora", "style:0.8", "--lora", "character:0.6"))
    got = pixels(output).astype(int)

    def direct(lora: list[dict[str, Any]]) -> np.ndarray:
        body = {"prompt": "a boat", "seed": 3, **FAST_STEPS, "lora": lora}
        if not edit:
            return server_image(server, {**body, "size": "64x64"}, "tiny-qwen-image")
        return server_edit(server, image, {**body, "strength": 1, "lora": json.dumps(lora)})

    assert int(np.abs(got - direct(STACK)).max()) <= 1
    for alone in [] if edit else STACK:
        assert int(np.abs(got - direct([alone])).max()) > 2, alone


def test_an_adapter_named_twice_exits_1_with_the_servers_message(server, tmp_path):
    output = tmp_path / "never.png"
    fields = ("--prompt", "a boat", "--size", "64x64", *FAST, "--output", output)
    result = run_client(server, *fields, "--lora", "style", "--lora", "style:0.5")
    assert result.returncode == 1 and not output.exists()
    assert result.stderr.startswith("error: 400: ") and "'style' is named twice" in result.stderr


def server_edit(server: str, image: Path, form: dict[str, Any]) -> np.ndarray:
    """The server's edit of `image` for the form `form`, asked for directly."""
    files = {"image": (image.name, image.read_bytes(), "image/png")}
    data = {name: str(value) for name, value in form.items()}
    response = httpx.post(
        f"{server}/v1/images/edits", data=data, files=files, headers=AUTH, timeout=60
    )
    assert response.status_code == 200, response.text
    encoded = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), dtype=int)
