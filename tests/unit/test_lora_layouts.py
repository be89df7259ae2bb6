"""LoRA adapters in every layout diffusers reads for the served pipeline: the same weights
written in each layout (testing/tiny_lora.py) read, through the pipeline's own converter, to
the same change of every linear layer of the tiny Qwen-Image transformer; what diffusers
cannot serve as a plain LoRA of the transformer is refused by name with a reason, from the
file's header where its tensor names tell; FLUX's alphas scale as diffusers scales them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from testing.tiny_lora import (
    LAYOUTS,
    UNSERVABLE,
    LoRAWeights,
    random_lora_weights,
    write_kohya_lora,
    write_layout,
    write_unservable,
)
from vllm_omni_images.engine.base import LoRAAdapter
from vllm_omni_images.engine.errors import LoRAAdapterError
from vllm_omni_images.engine.lora_files import AdapterWeights, meta_transformer, read_checked

Served = tuple[type, Any]
"""A pipeline class and its transformer (on the meta device)."""


@pytest.fixture(scope="module")
def qwen(tiny_model_dir: Path) -> Served:
    """QwenImagePipeline and the tiny model's transformer, on the meta device, as the omni
    engine builds it from the folder's config (`lora_files.meta_transformer`)."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline, meta_transformer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def weights(qwen: Served) -> LoRAWeights:
    return random_lora_weights(qwen[1], seed=3)


def read(path: Path, served: Served, max_rank: int = 16) -> AdapterWeights:
    pipeline, transformer = served
    return read_checked(LoRAAdapter("style", 1, str(path)), max_rank, transformer, pipeline)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_reads_to_the_same_change_of_every_layer(
    tmp_path: Path, qwen: Served, weights: LoRAWeights, layout: str
) -> None:
    """Kohya's and musubi-tuner's alphas (folded in by diffusers' converter), diffusers' and
    PEFT's lora_alpha, ComfyUI's, ai-toolkit's and PEFT's module names: B @ A is the same."""
    read_back = read(write_layout(layout, weights, tmp_path), qwen)
    assert set(read_back.modules) == set(weights) and read_back.rank == 4
    for module, (down, up) in weights.items():
        got_down, got_up = read_back.modules[module]
        torch.testing.assert_close(got_up @ got_down, up @ down, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", UNSERVABLE)
def test_what_diffusers_cannot_serve_is_refused_by_name_and_why(
    tmp_path: Path,
    qwen: Served,
    weights: LoRAWeights,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LoKr, LoHa, DoRA (which diffusers would drop with a warning), a text encoder's
    weights, biases: refused from the header, before any weight is read; a file diffusers'
    converter raises on (ComfyUI's layout without alphas), once read. One line, quoting no
    tensor name."""
    path = write_unservable(kind, weights, tmp_path)
    if kind != "no alpha":  # the converter needs the weights to tell
        monkeypatch.setattr("safetensors.safe_open", _no_read)
    with pytest.raises(LoRAAdapterError) as refused:
        read(path, qwen)
    message = str(refused.value)
    assert message.startswith("LoRA adapter 'style' cannot be served: ")
    assert UNSERVABLE[kind] in message and "\n" not in message
    for quoted in ("lora_unet", "lokr_w", "hada_", "dora_scale", "magnitude", "q_proj", "KeyError"):
        assert quoted not in message
    assert "QwenImagePipeline" in message or kind != "no alpha"  # whose converter refused it


def _no_read(*args: object, **kwargs: object) -> Any:
    raise AssertionError("the weights were read")


def test_kohya_adapters_are_checked_from_their_header_before_any_weight_is_read(
    tmp_path: Path, qwen: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diffusers' converter runs on stand-ins of the tensors (the meta device; alphas 1.0):
    the converted layers' rank and shapes are checked against the model unread."""
    module = "transformer_blocks.0.attn.to_q"
    layer: Any = qwen[1].get_submodule(module)
    high = {module: (torch.zeros(32, layer.in_features), torch.zeros(layer.out_features, 32))}
    wide = {module: (torch.zeros(4, 3072), torch.zeros(3072, 4))}  # the real model's width
    monkeypatch.setattr("safetensors.safe_open", _no_read)
    with pytest.raises(LoRAAdapterError, match="its rank 32 is above --max-lora-rank 16"):
        read(write_kohya_lora(high, tmp_path / "high.safetensors", alpha=8.0), qwen)
    with pytest.raises(LoRAAdapterError, match=r"another model: its transformer_blocks\.0\."):
        read(write_kohya_lora(wide, tmp_path / "wide.safetensors", alpha=8.0), qwen, 16)


def test_a_file_larger_than_any_adapter_of_the_model_is_refused_unread(
    tmp_path: Path, qwen: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a converter would make of its tensors, a file larger than an adapter of rank
    --max-lora-rank on every linear layer (float64) is not read."""
    from testing.tiny_lora import write_sparse_lora

    # Rank 1 matrices of 2**26 features: no rank above the limit, 512 MiB of weights.
    big = write_sparse_lora(tmp_path / "big.safetensors", "img_in", 2**26, 2**26, 1)
    monkeypatch.setattr("safetensors.safe_open", _no_read)
    with pytest.raises(LoRAAdapterError, match="larger than any LoRA adapter of rank at most 16"):
        read(big, qwen)


@pytest.fixture(scope="module")
def flux() -> Served:
    """FluxPipeline and a tiny FLUX transformer on the meta device."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            axes_dims_rope=(2, 2, 4),
        )
    return FluxPipeline, transformer


def test_flux_alpha_tensors_scale_as_diffusers_scales_them(tmp_path: Path, flux: Served) -> None:
    """FLUX's converter returns `alpha` tensors beside lora_A/lora_B (`return_alphas`):
    each layer is scaled by its alpha / rank, a layer without one by the most common alpha."""
    down, up = torch.randn(2, 16), torch.randn(16, 2)
    tensors: dict[str, torch.Tensor] = {}
    for module in ("to_q", "to_k", "to_v"):
        key = f"transformer.transformer_blocks.0.attn.{module}"
        tensors |= {f"{key}.lora_A.weight": down.clone(), f"{key}.lora_B.weight": up.clone()}
    for module, alpha in (("to_q", 8.0), ("to_k", 8.0)):
        tensors[f"transformer.transformer_blocks.0.attn.{module}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp_path / "flux.safetensors"))
    read_back = read(tmp_path / "flux.safetensors", flux)
    for module in ("to_q", "to_k", "to_v"):  # to_v: the most common alpha, 8
        got_down, got_up = read_back.modules[f"transformer_blocks.0.attn.{module}"]
        torch.testing.assert_close(got_up @ got_down, 4 * up @ down)


def test_flux_kohya_files_whose_converter_needs_the_weights_are_read_then_checked(
    tmp_path: Path, flux: Served
) -> None:
    """FLUX's Kohya converter splits a fused qkv layer by looking for zeros in its up matrix,
    which stand-ins cannot tell: the file (bounded by its size) is read, converted, then
    checked."""
    rank = 6  # divisible by 3: the converter checks the up matrix for zeros
    down, up = torch.randn(rank, 16), torch.randn(48, rank)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file(
        {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(3.0),
        },
        str(tmp_path / "kohya.safetensors"),
    )
    read_back = read(tmp_path / "kohya.safetensors", flux)
    for index, module in enumerate(("to_q", "to_k", "to_v")):
        got_down, got_up = read_back.modules[f"transformer_blocks.0.attn.{module}"]
        expected = 0.5 * up[16 * index : 16 * (index + 1)] @ down  # alpha 3 / rank 6
        torch.testing.assert_close(got_up @ got_down, expected)
    with pytest.raises(LoRAAdapterError, match="its rank 6 is above --max-lora-rank 4"):
        read(tmp_path / "kohya.safetensors", flux, max_rank=4)
