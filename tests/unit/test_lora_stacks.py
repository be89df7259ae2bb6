"""A stack of adapters written as one (`lora_stacks.stack_weights`): on every layer its B @ A
is the sum of the adapters' scaled deltas, whatever layers and ranks each adapter has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vllm_omni_images.engine.lora_files import (
    DIFFUSERS_WEIGHTS,
    AdapterWeights,
    diffusers_state_dict,
    open_adapter,
    read_layout,
)
from vllm_omni_images.engine.lora_stacks import stack_weights

Q, OUT = "blocks.0.to_q", "blocks.0.to_out.0"


def random_pair(
    rank: int, in_features: int, out_features: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rank, in_features, generator=generator),
        torch.randn(out_features, rank, generator=generator),
    )


def delta(weights: AdapterWeights, module_name: str) -> torch.Tensor:
    down, up = weights.modules[module_name]
    return up @ down


# `style` changes both layers at rank 4 (`to_out` at rank 2 only: a rank pattern); `other`
# changes `to_q` alone at rank 3.
STYLE = AdapterWeights({Q: random_pair(4, 8, 6, seed=1), OUT: random_pair(2, 6, 8, seed=2)}, 4)
OTHER = AdapterWeights({Q: random_pair(3, 8, 6, seed=3)}, 3)


def test_the_product_is_the_sum_of_the_scaled_deltas_at_the_summed_rank() -> None:
    stacked = stack_weights([(STYLE, 0.8), (OTHER, -0.6)])
    assert stacked.rank == 7
    for module_name, (down, up) in stacked.modules.items():
        assert down.shape[0] == up.shape[1] == 7, module_name  # every layer: the summed rank
    expected_q = 0.8 * delta(STYLE, Q) - 0.6 * delta(OTHER, Q)
    torch.testing.assert_close(delta(stacked, Q), expected_q)
    torch.testing.assert_close(delta(stacked, OUT), 0.8 * delta(STYLE, OUT))
    assert set(stacked.modules) == {Q, OUT}


def test_the_order_of_the_parts_changes_no_delta() -> None:
    forward = stack_weights([(STYLE, 0.8), (OTHER, 0.6)])
    backward = stack_weights([(OTHER, 0.6), (STYLE, 0.8)])
    for module_name in (Q, OUT):
        torch.testing.assert_close(delta(forward, module_name), delta(backward, module_name))


def test_one_part_is_that_adapter_at_its_scale() -> None:
    down, up = stack_weights([(OTHER, 0.5)]).modules[Q]
    torch.testing.assert_close(down, OTHER.modules[Q][0])
    torch.testing.assert_close(up, 0.5 * OTHER.modules[Q][1])


def test_the_stack_in_diffusers_layout_reads_back_as_the_summed_delta(tmp_path: Path) -> None:
    """Its file has no alpha: the scaling is in B, so it is read at scaling 1."""
    stacked = stack_weights([(STYLE, 0.8), (OTHER, 0.6)])
    save_file(diffusers_state_dict(stacked), str(tmp_path / DIFFUSERS_WEIGHTS))
    read = read_layout(open_adapter(str(tmp_path), "summed"), None, "summed").weights()
    assert read.rank == 7
    for module_name in (Q, OUT):
        torch.testing.assert_close(delta(read, module_name), delta(stacked, module_name))


def test_an_empty_stack_and_layers_of_two_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one adapter"):
        stack_weights([])
    wide = AdapterWeights({Q: random_pair(2, 16, 6, seed=4)}, 2)
    with pytest.raises(ValueError, match=f"{Q} with different shapes"):
        stack_weights([(STYLE, 1.0), (wide, 1.0)])
