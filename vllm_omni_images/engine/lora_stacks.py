"""A stack of LoRA adapters (`base.AdapterStack`) as one adapter, for an engine that applies
one adapter at a time (vllm-omni): A stacked along the rank, B scaled and concatenated, so that
B @ A is exactly the sum of the adapters' scaled deltas (`stack_weights`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_omni_images.engine.lora_files import AdapterWeights


def stack_weights(parts: Sequence[tuple[AdapterWeights, float]]) -> AdapterWeights:
    """One adapter of rank `sum(weights.rank)` whose delta on each layer is the sum of
    `scale x delta` over `parts`: per layer, adapter i's A (rank, in) fills rows, and its B
    (out, rank) times its scale the same columns, of block i (of that adapter's rank; zeros where
    it has a lower rank on that layer, or no matrices for it). `ValueError` for no parts, or
    adapters of one layer with different shapes."""
    if not parts:
        raise ValueError("a stack holds at least one adapter")
    shapes: dict[str, tuple[int, int, torch.dtype]] = {}
    for weights, _ in parts:
        for module_name, (down, up) in weights.modules.items():
            shape = (down.shape[1], up.shape[0], down.dtype)
            if shapes.setdefault(module_name, shape)[:2] != shape[:2]:
                raise ValueError(f"the adapters change {module_name} with different shapes")
    rank = sum(weights.rank for weights, _ in parts)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, (in_features, out_features, dtype) in shapes.items():
        down = torch.zeros(rank, in_features, dtype=dtype)
        up = torch.zeros(out_features, rank, dtype=dtype)
        start = 0
        for weights, scale in parts:
            if (pair := weights.modules.get(module_name)) is not None:
                own_rank = pair[0].shape[0]
                down[start : start + own_rank] = pair[0]
                up[:, start : start + own_rank] = pair[1] * scale
            start += weights.rank
        modules[module_name] = (down, up)
    return AdapterWeights(modules, rank)
