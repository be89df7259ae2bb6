"""The CPU platform's stand-ins for vLLM's activation kernels (`platforms/cpu_kernels.py`): on a
vLLM without `vllm._C`, vLLM's activation layers can be built on the CPU platform, and each op
computes what its layer's own PyTorch code computes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.activation import (
    FastGELU,
    GeluAndMul,
    NewGELU,
    QuickGELU,
    SiluAndMul,
)

from vllm_omni_images.platforms.cpu_kernels import ACTIVATIONS, register_missing_activation_ops

LAYERS: dict[str, Callable[[], CustomOp]] = {
    "silu_and_mul": SiluAndMul,
    "gelu_and_mul": lambda: GeluAndMul("none"),
    "gelu_tanh_and_mul": lambda: GeluAndMul("tanh"),
    "gelu_new": NewGELU,
    "gelu_fast": FastGELU,
    "gelu_quick": QuickGELU,
}


def test_every_stand_in_has_its_layer() -> None:
    assert set(LAYERS) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_op_computes_its_layers_native_forward(name: str) -> None:
    register_missing_activation_ops()
    assert register_missing_activation_ops() == []  # defined once
    with set_current_vllm_config(VllmConfig()):
        layer = LAYERS[name]()  # looks the op up on the CPU platform
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    expected = layer.forward_native(x)
    out = torch.empty_like(expected)
    getattr(torch.ops._C, name)(out, x)
    torch.testing.assert_close(out, expected)
