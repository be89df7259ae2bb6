"""The native CPU bodies of vLLM's activation ops (`platforms/cpu_ops.py`): each matches its
vLLM layer's `forward_native`, and the CPU platform's set-up registers only what is absent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from vllm_omni_images.platforms.cpu_ops import NATIVE_OPS, register_missing_ops


@pytest.fixture(scope="module")
def activation() -> Iterator[Any]:
    """vLLM's activation module, with the ops registered as `CpuOmniPlatform.import_kernels`
    registers them (vLLM's CPU kernel import first); without importing vllm-omni."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM runs its own kernels on this machine's accelerator")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import activation
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.import_kernels()
    register_missing_ops()
    with set_current_vllm_config(VllmConfig()):  # vLLM's layers are built under a config
        yield activation


LAYERS: dict[str, Callable[[Any], Any]] = {
    "silu_and_mul": lambda act: act.SiluAndMul(),
    "gelu_and_mul": lambda act: act.GeluAndMul(approximate="none"),
    "gelu_tanh_and_mul": lambda act: act.GeluAndMul(approximate="tanh"),
    "gelu_new": lambda act: act.NewGELU(),
    "gelu_fast": lambda act: act.FastGELU(),
    "gelu_quick": lambda act: act.QuickGELU(),
}


def test_every_native_op_has_its_layer() -> None:
    assert set(LAYERS) == set(NATIVE_OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_op_matches_its_layers_native_forward(
    activation: Any, name: str, dtype: torch.dtype
) -> None:
    layer = LAYERS[name](activation)  # binds torch.ops._C.<name> in its __init__ on the CPU
    op = getattr(torch.ops._C, name)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    expected = layer.forward_native(x)
    out = torch.full_like(expected, float("nan"))
    assert op(out, x) is None  # vLLM's schema: the result goes into `out`
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_every_activation_vllm_names_builds_on_the_cpu(activation: Any) -> None:
    """`get_act_fn`'s names (T5's `gelu_new`, CLIP's `quick_gelu`, ...) all build."""
    for name in activation._ACTIVATION_REGISTRY:
        activation.get_act_fn(name)


def test_only_absent_ops_are_registered_once() -> None:
    namespace = "_vllm_omni_images_cpu_ops_test"
    library = torch.library.Library(namespace, "FRAGMENT")
    library.define("gelu_new(Tensor! out, Tensor input) -> ()")

    def sevens(out: torch.Tensor, x: torch.Tensor) -> None:
        out.fill_(7.0)

    library.impl("gelu_new", sevens, "CPU")
    library.define("gelu_fast(Tensor! out, Tensor input) -> ()")  # defined, without a CPU kernel

    added = register_missing_ops(namespace)

    assert added == [name for name in NATIVE_OPS if name != "gelu_new"]
    out = torch.empty(4)
    getattr(torch.ops, namespace).gelu_new(out, torch.zeros(4))
    assert out.eq(7.0).all()  # the op that was there is left alone
    getattr(torch.ops, namespace).gelu_fast(out, torch.zeros(4))
    assert out.eq(0.0).all()  # the defined one got the native body
    assert register_missing_ops(namespace) == []
