"""Native bodies for the vLLM `_C` ops that vLLM's activation layers bind in their `__init__` on
the CPU, although their CPU `forward` is the native one: a CPU build of vLLM without them (or
no `vllm._C` at all) could not even build those layers (vllm-omni's T5 encoder, FLUX's, needs
`gelu_new`). Registered by `CpuOmniPlatform` after vLLM's own kernel import, only where absent."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812

NAMESPACE = "_C"


def _gated(activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def body(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return activation(x[..., :d]) * x[..., d:]

    return body


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_quick(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


NATIVE_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # vllm/model_executor/layers/activation.py binds these on the CPU; each body is its
    # layer's `forward_native` (tests/unit/test_cpu_ops.py compares them).
    "silu_and_mul": _gated(F.silu),  # SiluAndMul
    "gelu_and_mul": _gated(lambda x: F.gelu(x, approximate="none")),  # GeluAndMul("none")
    "gelu_tanh_and_mul": _gated(lambda x: F.gelu(x, approximate="tanh")),  # GeluAndMul("tanh")
    "gelu_new": _gelu_new,  # NewGELU
    "gelu_fast": _gelu_fast,  # FastGELU
    "gelu_quick": _gelu_quick,  # QuickGELU
}
"""Op name -> the result its out tensor receives; vLLM's schema for each is
`name(Tensor! out, Tensor input) -> ()`."""

# Kept for the life of the process: a `torch.library.Library` deregisters its ops when freed.
_LIBRARIES: list[torch.library.Library] = []


def _defined(namespace: str, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{namespace}::{name}", "")
    except RuntimeError:
        return False
    return True


def _has_cpu_kernel(namespace: str, name: str) -> bool:
    return _defined(namespace, name) and torch._C._dispatch_has_computed_kernel_for_dispatch_key(
        f"{namespace}::{name}", "CPU"
    )


def register_missing_ops(namespace: str = NAMESPACE) -> list[str]:
    """Register each op of `NATIVE_OPS` that `torch.ops.<namespace>` lacks (or has without a
    CPU kernel) with its native body; returns the names registered now. Call it after vLLM's
    kernel import: a kernel library loaded later would find its op names taken."""
    missing = [name for name in NATIVE_OPS if not _has_cpu_kernel(namespace, name)]
    if not missing:
        return []
    library = torch.library.Library(namespace, "FRAGMENT")
    for name in missing:
        if not _defined(namespace, name):
            library.define(f"{name}(Tensor! out, Tensor input) -> ()")
        library.impl(name, _out_variant(NATIVE_OPS[name]), "CompositeExplicitAutograd")
    _LIBRARIES.append(library)
    return missing


def _out_variant(body: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def kernel(out: torch.Tensor, x: torch.Tensor) -> None:
        out.copy_(body(x))

    return kernel
