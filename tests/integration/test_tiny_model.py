"""The embedded model: built once, deterministically, and shaped like the real Qwen-Image."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vllm_omni_images import tiny_model
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner
from vllm_omni_images.tiny_model import (
    CACHE_ENV_VAR,
    MARKER_FILE,
    TINY_MODEL_NAME,
    build_tiny_model,
    ensure_tiny_model,
    is_built,
    resolve_model_path,
)


def weight_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*.safetensors"))
    }


def test_the_model_folder_is_a_qwen_image_pipeline(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["tokenizer"][1] == "Qwen2Tokenizer"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert set(weight_digests(tiny_model_dir)) == {
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }


def test_building_again_gives_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    build_tiny_model(tmp_path)
    assert weight_digests(tmp_path) == weight_digests(tiny_model_dir)


def test_a_built_model_is_reused_not_rebuilt(tiny_model_dir: Path, model_cache: Path) -> None:
    marker = tiny_model_dir / MARKER_FILE
    before = marker.stat().st_mtime_ns
    assert ensure_tiny_model(model_cache) == tiny_model_dir
    assert marker.stat().st_mtime_ns == before


def test_the_cache_folder_follows_the_environment(
    tiny_model_dir: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(model_cache))
    assert resolve_model_path(TINY_MODEL_NAME) == str(tiny_model_dir)
    assert resolve_model_path("/models/Qwen-Image") == "/models/Qwen-Image"
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert tiny_model.cache_dir() == Path("~/.cache/vllm-omni-images").expanduser()


def test_a_folder_without_a_current_marker_is_not_built(tmp_path: Path) -> None:
    assert not is_built(tmp_path)
    (tmp_path / MARKER_FILE).write_text(json.dumps({"version": -1}))
    assert not is_built(tmp_path)
    (tmp_path / MARKER_FILE).write_text("not json")
    assert not is_built(tmp_path)


def test_the_system_prompt_is_exactly_what_the_pipeline_drops(tiny_runner: DiffusersRunner) -> None:
    pipe = tiny_runner.pipeline
    system_part = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(system_part).input_ids) == pipe.prompt_template_encode_start_idx
    text = "a café, 3 cats"
    assert pipe.tokenizer.decode(pipe.tokenizer(text).input_ids) == text
