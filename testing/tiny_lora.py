"""Tiny random LoRA adapters for the tiny model, made with peft and saved in diffusers' format.

Real structure (peft's LoRA layers on the tiny Qwen-Image transformer's attention
projections, saved by `QwenImagePipeline.save_lora_weights` with their PEFT config), random
weights: each seed gives an adapter that visibly changes the image. Shared by the tests and
`benchmarks/lora.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
    import json

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
