"""Stacks of LoRA adapters in tests: one adapter file holding a stack's summed delta, to
compare a stack's image with."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vllm_omni_images.engine.base import LoRAAdapter
from vllm_omni_images.engine.lora_files import (
    DIFFUSERS_WEIGHTS,
    diffusers_state_dict,
    meta_transformer,
    read_checked,
    served_pipeline,
)
from vllm_omni_images.engine.lora_stacks import stack_weights


def write_summed_lora(model_dir: Path, parts: Sequence[tuple[Path, float]], folder: Path) -> Path:
    """One adapter in diffusers' layout whose delta is the sum of `scale x delta` of the
    adapters at `parts` (`lora_stacks.stack_weights`), written into `folder`."""
    from safetensors.torch import save_file

    transformer = meta_transformer(str(model_dir))
    pipeline = served_pipeline(str(model_dir))
    read = [
        (read_checked(LoRAAdapter(path.name, 0, str(path)), 512, transformer, pipeline), scale)
        for path, scale in parts
    ]
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        key: tensor.contiguous()
        for key, tensor in diffusers_state_dict(stack_weights(read)).items()
    }
    save_file(state, str(folder / DIFFUSERS_WEIGHTS))
    return folder
