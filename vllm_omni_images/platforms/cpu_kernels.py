"""vLLM's activation ops in `torch.ops._C`, in plain PyTorch, for a vLLM build without its CPU
kernels (`vllm._C`). On a CPU platform vLLM's activation layers look their op up when they are
built (`SiluAndMul`, `GeluAndMul`, `NewGELU`, ...), though on x86 their CPU forward runs PyTorch's
own code instead; without the op the layer cannot even be built."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.nn import functional

logger = logging.getLogger(__name__)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = _halves(x)
    return functional.silu(gate) * up


def _gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = _halves(x)
    return functional.gelu(gate) * up


def _gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = _halves(x)
    return functional.gelu(gate, approximate="tanh") * up


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return functional.gelu(x, approximate="tanh")


def _gelu_quick(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu_and_mul": _silu_and_mul,
    "gelu_and_mul": _gelu_and_mul,
    "gelu_tanh_and_mul": _gelu_tanh_and_mul,
    "gelu_new": _gelu_tanh,  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_fast": _gelu_tanh,  # the same, with sqrt(2/pi) written 0.7978845608
    "gelu_quick": _gelu_quick,
}
"""The ops vLLM's activation layers look up on a CPU platform, by name, as each layer's native
forward computes them (vLLM's schema: `op(Tensor! out, Tensor input) -> ()`)."""

_library: torch.library.Library | None = None


def register_missing_activation_ops() -> list[str]:
    """Define each op of `ACTIVATIONS` that `torch.ops._C` lacks (none where `vllm._C` loaded);
    return the names defined. Safe to call more than once."""
    global _library
    missing = [name for name in ACTIVATIONS if not hasattr(torch.ops._C, name)]
    if not missing:
        return []
    if _library is None:
        _library = torch.library.Library("_C", "FRAGMENT")
    for name in missing:
        _library.define(f"{name}(Tensor! out, Tensor input) -> ()")
        _library.impl(name, _writing_into_out(ACTIVATIONS[name]), "CompositeExplicitAutograd")
    logger.info("vLLM's CPU kernels are not installed; PyTorch's code stands in for %s", missing)
    return missing


def _writing_into_out(
    activation: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def kernel(out: torch.Tensor, x: torch.Tensor) -> None:
        out.copy_(activation(x))

    return kernel
