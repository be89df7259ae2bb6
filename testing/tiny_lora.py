"""Tiny random LoRA adapters for the tiny model, made with peft and saved in diffusers' format,
and the same weights written in the other layouts adapters ship in.

Real structure (peft's LoRA layers on the tiny Qwen-Image transformer's attention
projections, saved by `QwenImagePipeline.save_lora_weights` with their PEFT config), random
weights: each seed gives an adapter that visibly changes the image. Shared by the tests and
`benchmarks/lora.py`.

`write_layout` writes one adapter's weights (`LoRAWeights`: each layer's A and B, the change
being B @ A) in each layout `LAYOUTS` names, scaled so that diffusers reads the same change
from each: the key layouts are the inverses of diffusers' converters for Qwen-Image
(`diffusers.loaders.lora_conversion_utils._convert_non_diffusers_qwen_lora_to_diffusers`, which
`QwenImageLoraLoaderMixin.lora_state_dict` runs). `write_unservable` writes the kinds of
adapter diffusers cannot serve as a plain LoRA (`UNSERVABLE`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

LoRAWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""A transformer adapter: each layer's diffusers name -> (A (rank, in), B (out, rank)), the
layer's change being B @ A (alpha = rank)."""

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def build_tiny_lora(
    model_dir: Path, folder: Path, seed: int, rank: int = 4, alpha: int | None = None
) -> Path:
    """Write a rank-`rank` adapter of the model's transformer into `folder` and return it."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(
        model_dir / "transformer", torch_dtype=torch.float32
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        target_modules=list(TARGET_MODULES),
        init_lora_weights=False,  # random A and B: the adapter changes the image from the start
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name="tiny")
    layers = get_peft_model_state_dict(transformer, adapter_name="tiny")
    QwenImagePipeline.save_lora_weights(
        folder,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return folder


def write_foreign_lora(folder: Path) -> Path:
    """An adapter in diffusers' format for a larger Qwen-Image (its attention is 3072 wide, the
    tiny model's is not): it names a layer the tiny model has, with other shapes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
        },
        str(folder / "pytorch_lora_weights.safetensors"),
    )
    return folder


def write_sparse_lora(
    file: Path, module: str, in_features: int, out_features: int, rank: int
) -> Path:
    """A diffusers-format adapter file of one transformer layer (`module`, `in_features` to
    `out_features`) at `rank`, whose weights are a hole: a sparse file as long as its header
    says (gigabytes for a large rank) that takes no disk, for checks that must refuse it from
    its header alone."""
    sizes = (rank * in_features * 4, out_features * rank * 4)  # float32
    header = {
        f"transformer.{module}.lora_A.weight": {
            "dtype": "F32",
            "shape": [rank, in_features],
            "data_offsets": [0, sizes[0]],
        },
        f"transformer.{module}.lora_B.weight": {
            "dtype": "F32",
            "shape": [out_features, rank],
            "data_offsets": [sizes[0], sum(sizes)],
        },
    }
    raw = json.dumps(header).encode()
    with file.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + sum(sizes))
    return file


def tiny_lora_weights(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The weights of an adapter `build_tiny_lora` wrote (alpha = rank: its change is B @ A)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    down, up = ".lora_A.weight", ".lora_B.weight"
    modules = sorted(key[len("transformer.") : -len(down)] for key in state if key.endswith(down))
    return {m: (state[f"transformer.{m}{down}"], state[f"transformer.{m}{up}"]) for m in modules}


def random_lora_weights(
    transformer: torch.nn.Module, seed: int, rank: int = 4
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random weights of rank `rank` for every linear layer of `transformer` (its structure
    only: it may be on the meta device), the top-level ones and each block's."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, layer in transformer.named_modules():
        if isinstance(layer, torch.nn.Linear):
            down = torch.randn(rank, layer.in_features, generator=generator)
            up = torch.randn(layer.out_features, rank, generator=generator)
            weights[name] = (down, up)
    return weights


LAYOUTS = (
    "diffusers",
    "peft",
    "peft-module-names",
    "kohya",
    "musubi-tuner",
    "comfyui",
    "comfyui-lora-a-b",
    "ai-toolkit",
)
"""The layouts `write_layout` writes, each read by diffusers to the same change."""

KOHYA_ALPHA = 2.0
MUSUBI_ALPHA = 1.0
"""musubi-tuner's default `--network_alpha`."""
CONFIG_ALPHA = 8
"""lora_alpha of the diffusers and PEFT configs written: each differs from the tiny rank (4),
so that the scaling (alpha / rank) matters."""


def write_layout(layout: str, weights: LoRAWeights, folder: Path) -> Path:
    """`weights` in `layout` (one of `LAYOUTS`) under `folder`: the adapter's path."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        return write_diffusers_lora(weights, folder, CONFIG_ALPHA)
    if layout == "peft":
        return write_peft_lora(weights, folder, CONFIG_ALPHA)
    file = folder / f"{layout}.safetensors"
    if layout == "peft-module-names":
        return write_peft_module_names_lora(weights, file)
    if layout == "kohya":
        return write_kohya_lora(weights, file, KOHYA_ALPHA)
    if layout == "musubi-tuner":
        return write_kohya_lora(weights, file, MUSUBI_ALPHA, metadata=musubi_metadata(weights))
    if layout == "comfyui":
        return write_comfyui_lora(weights, file, alpha=KOHYA_ALPHA)
    if layout == "comfyui-lora-a-b":
        return write_comfyui_lora(weights, file, alpha=None)
    if layout == "ai-toolkit":
        return write_ai_toolkit_lora(weights, file)
    raise ValueError(f"no layout {layout!r}")


def write_diffusers_lora(weights: LoRAWeights, folder: Path, alpha: int) -> Path:
    """diffusers' own layout (`transformer.<module>.lora_A/lora_B.weight`) as diffusers'
    `QwenImagePipeline.save_lora_weights` writes it, its PEFT config (`lora_alpha`) in the
    file's `lora_adapter_metadata`."""
    from diffusers import QwenImagePipeline

    rank = _rank(weights)
    QwenImagePipeline.save_lora_weights(
        folder,
        transformer_lora_layers=_named(weights, "", "lora_A.weight", "lora_B.weight", rank / alpha),
        transformer_lora_adapter_metadata={
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights}),
        },
    )
    return folder


def write_peft_lora(weights: LoRAWeights, folder: Path, alpha: int) -> Path:
    """PEFT's `save_pretrained` folder: `adapter_config.json` and `adapter_model.safetensors`,
    its tensors named `base_model.model.<module>.lora_A/lora_B.weight`."""
    rank = _rank(weights)
    tensors = _named(weights, "base_model.model.", "lora_A.weight", "lora_B.weight", rank / alpha)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights}),
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_peft_module_names_lora(weights: LoRAWeights, file: Path) -> Path:
    """The names of a PEFT model's own state dict (`<module>.lora_A.default.weight`), which
    diffusers' converter maps by dropping `default.` (and prefixing `transformer.`)."""
    save_file(_named(weights, "", "lora_A.default.weight", "lora_B.default.weight"), str(file))
    return file


def write_kohya_lora(
    weights: LoRAWeights, file: Path, alpha: float, metadata: dict[str, str] | None = None
) -> Path:
    """Kohya's layout, as musubi-tuner writes it for Qwen-Image: `lora_unet_<module with _ for
    .>.lora_down/lora_up.weight` and a scalar `.alpha` per layer (the change is alpha / rank *
    up @ down), the inverse of the converter's `lora_unet_` branch (its protected n-grams such
    as `to_q`, `to_out`, `add_q_proj` keep their underscores)."""
    rank = _rank(weights)
    tensors = _named(
        weights, "lora_unet_", "lora_down.weight", "lora_up.weight", rank / alpha, kohya=True
    )
    tensors.update({f"lora_unet_{m.replace('.', '_')}.alpha": torch.tensor(alpha) for m in weights})
    save_file(tensors, str(file), metadata=metadata)
    return file


def musubi_metadata(weights: LoRAWeights) -> dict[str, str]:
    """The training metadata musubi-tuner's LoRA network writes (sd-scripts' `ss_` keys)."""
    return {
        "ss_network_module": "networks.lora_qwen_image",
        "ss_network_dim": str(_rank(weights)),
        "ss_network_alpha": str(MUSUBI_ALPHA),
        "ss_base_model_version": "qwen_image",
    }


def write_comfyui_lora(weights: LoRAWeights, file: Path, alpha: float | None) -> Path:
    """ComfyUI's layout: `diffusion_model.<module>`, with `lora_down/lora_up.weight` and
    `.alpha` (ComfyUI's own LoRA files; `alpha=None` writes none, which diffusers' converter
    cannot read: it looks up every layer's alpha), or else `lora_A/lora_B.weight` (the
    ComfyUI-ready files other trainers write); the converter drops the prefix."""
    if alpha is None:
        tensors = _named(weights, "diffusion_model.", "lora_A.weight", "lora_B.weight")
    else:
        rank = _rank(weights)
        tensors = _named(
            weights, "diffusion_model.", "lora_down.weight", "lora_up.weight", rank / alpha
        )
        tensors.update({f"diffusion_model.{m}.alpha": torch.tensor(alpha) for m in weights})
    save_file(tensors, str(file))
    return file


def write_comfyui_lora_without_alpha(weights: LoRAWeights, file: Path) -> Path:
    """ComfyUI's `lora_down/lora_up` layout without `.alpha` tensors (as ComfyUI's LoRA
    extraction writes it), which diffusers' Qwen-Image converter refuses (a KeyError)."""
    save_file(_named(weights, "diffusion_model.", "lora_down.weight", "lora_up.weight"), str(file))
    return file


def write_ai_toolkit_lora(weights: LoRAWeights, file: Path) -> Path:
    """ai-toolkit's layout for Qwen-Image: diffusers' names (`transformer.<module>.lora_A/
    lora_B.weight`) with no PEFT config (alpha = rank)."""
    save_file(_named(weights, "transformer.", "lora_A.weight", "lora_B.weight"), str(file))
    return file


UNSERVABLE = {
    "LoKr": "LoKr",
    "LoHa": "LoHa",
    "DoRA": "DoRA",
    "PEFT DoRA": "DoRA",
    "text encoder": "text encoder",
    "Kohya text encoder": "text encoder",
    "no alpha": "diffusers cannot read it",
    "bias": "besides LoRA weights",
}
"""Files `write_unservable` writes, and a word of the reason each is refused with."""


def write_unservable(kind: str, weights: LoRAWeights, folder: Path) -> Path:
    """An adapter file of one of the `UNSERVABLE` kinds, for the layers of `weights`: LyCORIS'
    LoKr (`lokr_w1`, `lokr_w2`) and LoHa (`hada_w1_a`...) in Kohya's names; DoRA as Kohya's
    trainers write it (`dora_scale`, which diffusers drops with a warning) and as PEFT does
    (`lora_magnitude_vector`); a text encoder's weights besides the transformer's, in
    diffusers' names and Kohya's (`lora_te_`); Kohya's layout in ComfyUI's names without
    alphas (diffusers' converter raises); a LoRA with biases (`lora_B.bias`)."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "adapter.safetensors"
    module, (down, up) = next(iter(weights.items()))
    kohya = "lora_unet_" + module.replace(".", "_")
    tensors = _named(weights, "transformer.", "lora_A.weight", "lora_B.weight")
    if kind == "LoKr":
        tensors = {
            f"{kohya}.lokr_w1": torch.ones(2, 2),
            f"{kohya}.lokr_w2": torch.ones(up.shape[0] // 2, down.shape[1] // 2),
            f"{kohya}.alpha": torch.tensor(1.0),
        }
    elif kind == "LoHa":
        tensors = {
            **{f"{kohya}.hada_w{i}_a": up for i in (1, 2)},
            **{f"{kohya}.hada_w{i}_b": down for i in (1, 2)},
            f"{kohya}.alpha": torch.tensor(1.0),
        }
    elif kind == "DoRA":
        tensors = _named(weights, "lora_unet_", "lora_down.weight", "lora_up.weight", kohya=True)
        tensors[f"{kohya}.alpha"] = torch.tensor(1.0)
        tensors[f"{kohya}.dora_scale"] = torch.ones(up.shape[0], 1)
    elif kind == "PEFT DoRA":
        tensors[f"transformer.{module}.lora_magnitude_vector"] = torch.ones(up.shape[0])
    elif kind == "text encoder":
        tensors["text_encoder.encoder.layers.0.q_proj.lora_A.weight"] = down.contiguous()
        tensors["text_encoder.encoder.layers.0.q_proj.lora_B.weight"] = up.contiguous()
    elif kind == "Kohya text encoder":
        tensors = _named(weights, "lora_unet_", "lora_down.weight", "lora_up.weight", kohya=True)
        tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = down
        tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = up
    elif kind == "no alpha":
        return write_comfyui_lora_without_alpha(weights, file)
    elif kind == "bias":
        tensors[f"transformer.{module}.lora_B.bias"] = torch.zeros(up.shape[0])
    else:
        raise ValueError(f"no unservable kind {kind!r}")
    # Copies: safetensors refuses tensors that share memory.
    save_file(
        {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}, str(file)
    )
    return file


def _named(
    weights: LoRAWeights,
    prefix: str,
    down_suffix: str,
    up_suffix: str,
    up_scale: float = 1.0,
    kohya: bool = False,
) -> dict[str, torch.Tensor]:
    """Each layer's A and B (B times `up_scale`) as `<prefix><module>.<suffix>`; with `kohya`,
    the module's dots written as underscores."""
    tensors = {}
    for module, (down, up) in weights.items():
        key = prefix + (module.replace(".", "_") if kohya else module)
        tensors[f"{key}.{down_suffix}"] = down.contiguous()
        tensors[f"{key}.{up_suffix}"] = (up * up_scale).contiguous()
    return tensors


def _rank(weights: LoRAWeights) -> int:
    return next(iter(weights.values()))[0].shape[0]


def main() -> None:
    """`python -m testing.tiny_lora FOLDER [FOLDER ...]`: adapters of the embedded model, the
    first made with `--seed`, each next with the next seed."""
    import argparse

    from vllm_omni_images.tiny_model import ensure_tiny_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    model_dir = ensure_tiny_model()
    for offset, folder in enumerate(args.folders):
        print(build_tiny_lora(model_dir, folder, args.seed + offset, args.rank))


if __name__ == "__main__":
    main()
