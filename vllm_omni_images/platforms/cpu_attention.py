"""vllm-omni's SDPA attention with a CPU `forward` (named by `CpuOmniPlatform`).

vllm-omni's `AttentionImpl.forward` dispatches on the platform (CUDA, ROCm, NPU, XPU, MUSA)
and raises for any other; `SDPAImpl._forward_impl` itself is plain
`torch.nn.functional.scaled_dot_product_attention` and runs on the CPU as it is.
"""

from __future__ import annotations

import torch
from vllm_omni.diffusion.attention.backends.abstract import AttentionMetadata
from vllm_omni.diffusion.attention.backends.sdpa import SDPABackend, SDPAImpl


class CpuSDPAImpl(SDPAImpl):
    """vllm-omni's SDPA attention, with the CPU branch its dispatching `forward` lacks."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        return self._forward_impl(query, key, value, attn_metadata, mask_mode="broadcast_k")


class CpuSDPABackend(SDPABackend):
    """vllm-omni's `TORCH_SDPA` backend, whose implementation runs on the CPU."""

    supported_platforms = None

    @staticmethod
    def get_name() -> str:
        return "CPU_SDPA"

    @staticmethod
    def get_impl_cls() -> type[CpuSDPAImpl]:
        return CpuSDPAImpl
