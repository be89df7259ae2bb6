"""Issue 31's adversarial cases on the runtime LoRA routes (vLLM's `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`, behind the API key; the server runs with `--enable-lora` and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). Each case unloads what it loaded, so the server
serves what it served before."""

from __future__ import annotations

import contextlib
import shutil
from typing import Any

import httpx

from testing import adversarial_inputs as inputs
from testing.adversarial_cases import FAST, Row, Target, describe, post_json, row
from vllm_omni_images.images.safe_text import echo

BIG_ADAPTER_BYTES = 2**30


def load(target: Target, name: str, path: object) -> tuple[Any, str, float]:
    body = {"lora_name": name, "lora_path": str(path)}
    return post_json(target, "/v1/load_lora_adapter", body, timeout_s=max(300, target.timeout_s))


def unload(target: Target, name: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        post_json(target, "/v1/unload_lora_adapter", {"lora_name": name}, timeout_s=30)


def model_ids(target: Target) -> list[str]:
    response = httpx.get(f"{target.base_url}/v1/models", headers=target.headers, timeout=30)
    return [card["id"] for card in response.json()["data"]]


def generate_with(target: Target, model: str) -> tuple[Any, str, float]:
    return post_json(target, "/v1/images/generations", {"prompt": "x", **FAST, "model": model})


def _named(case: str, name: str, target: Target) -> Row:
    """Load a good adapter under `name`; note what /v1/models lists then; unload it again."""
    path = inputs.copy_adapter(target.adapter_source, target.workdir / case)
    result = load(target, name, path)
    notes = ""
    if result[0] is not None and result[0].status_code == 200:
        ids = model_ids(target)
        used = generate_with(target, name)[1]
        notes = f"/v1/models then lists {[echo(i) for i in ids]}; a generation naming it: {used}"
        unload(target, name)
    return row(case, 6, f"load an adapter named {echo(name)}", result, notes)


def adapter_named_like_the_base(target: Target) -> list[Row]:
    return [_named("lora_named_like_the_base", model_ids(target)[0], target)]


def adapter_named_with_a_slash(target: Target) -> list[Row]:
    return [_named("lora_named_with_a_slash", "team/style", target)]


def adapter_named_5000_characters(target: Target) -> list[Row]:
    return [_named("lora_named_5000_chars", "a" * 5000, target)]


def adapter_path_probes(target: Target) -> list[Row]:
    """A path that does not exist and one that exists but is no adapter: telling them apart
    lets a key holder probe the server's files."""
    missing = load(target, "probe", "/nonexistent-adversarial/adapter")
    existing = load(target, "probe", "/etc/hostname")
    same = describe(missing[0]) == describe(existing[0])
    notes = "the same message as for the missing path" if same else "a different message"
    return [
        row("lora_path_probes:missing", 6, "load from /nonexistent-adversarial/adapter", missing),
        row("lora_path_probes:not an adapter", 6, "load from /etc/hostname", existing, notes),
    ]


def adapter_header_secret(target: Target) -> list[Row]:
    path = inputs.secret_header_adapter(target.workdir / "secret")
    result = load(target, "secret", path)
    echoed = result[0] is not None and inputs.SECRET in result[0].text
    unload(target, "secret")
    sent = f"load a safetensors file whose header holds {inputs.SECRET}"
    return [row("lora_header_secret", 6, sent, result, f"secret echoed: {echoed}")]


def adapter_sparse_big_rank(target: Target, size_bytes: int = BIG_ADAPTER_BYTES) -> list[Row]:
    """An adapter file of `size_bytes` (sparse: no disk) whose header says a rank far above
    `--max-lora-rank`: is the rank read from the header, or the whole file first?"""
    folder = target.workdir / "big-rank"
    _, rank = inputs.sparse_big_rank_adapter(target.adapter_source, folder, size_bytes)
    try:
        result = load(target, "big", folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    unload(target, "big")
    sent = f"load a {size_bytes / 2**30:.1f} GiB (sparse) adapter of rank {rank}"
    return [row("lora_big_rank_file", 6, sent, result)]


def adapter_evicted_then_deleted(target: Target) -> list[Row]:
    """An adapter used once, pushed out of the server's adapter cache by `max_cpu_loras`
    others, then its files deleted, then named by a request."""
    gone = inputs.copy_adapter(target.adapter_source, target.workdir / "evicted")
    loaded = load(target, "evicted", gone)
    fillers = [f"filler-{i}" for i in range(target.max_cpu_loras)]
    try:
        first = generate_with(target, "evicted")[1]
        for filler in fillers:
            path = inputs.copy_adapter(target.adapter_source, target.workdir / filler)
            load(target, filler, path)
            generate_with(target, filler)
        shutil.rmtree(gone)
        result = generate_with(target, "evicted")
        listed = "evicted" in model_ids(target)
    finally:
        for name in ("evicted", *fillers):
            unload(target, name)
    notes = f"loaded {loaded[1]}, first use {first}; still in /v1/models: {listed}"
    sent = "generation naming an adapter evicted from the cache whose files were then deleted"
    return [row("lora_evicted_files_deleted", 6, sent, result, notes)]
