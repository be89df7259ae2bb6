"""`CpuOmniPlatform`: vLLM's `CpuPlatform` with vllm-omni's `OmniPlatform` interface answered
for the CPU, so vllm-omni's worker, model runner and pipelines run there."""

from __future__ import annotations

from typing import Any

import psutil
import torch
from vllm.platforms.cpu import CpuPlatform
from vllm_omni.platforms.interface import OmniPlatform, OmniPlatformEnum

# By path: vllm-omni resolves it when a layer is built; importing it here would be circular
# (vllm-omni's attention modules read `current_omni_platform` when they are imported).
CPU_SDPA_BACKEND = "vllm_omni_images.platforms.cpu_attention.CpuSDPABackend"


class CpuOmniPlatform(OmniPlatform, CpuPlatform):
    """vLLM's CPU platform with vllm-omni's diffusion interface: one device, psutil's memory."""

    _omni_enum = OmniPlatformEnum.OOT

    @classmethod
    def get_torch_device(cls, local_rank: int | None = None) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def get_device_count(cls) -> int:
        return 1

    @classmethod
    def get_device_version(cls) -> str | None:
        return None

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        return None

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def synchronize(cls) -> None:
        return None

    @classmethod
    def empty_cache(cls) -> None:
        return None

    @classmethod
    def reset_peak_memory_stats(cls, device: Any = None) -> None:
        return None

    @classmethod
    def get_free_memory(cls, device: torch.device | None = None) -> int:
        return int(psutil.virtual_memory().available)

    @classmethod
    def get_device_memory(cls, device: torch.device | None = None) -> tuple[int, int]:
        memory = psutil.virtual_memory()
        return int(memory.available), int(memory.total)

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return int(psutil.virtual_memory().total)

    @classmethod
    def max_memory_allocated(cls, device: Any = None) -> int:
        return int(psutil.Process().memory_info().rss)

    @classmethod
    def max_memory_reserved(cls, device: Any = None) -> int:
        return int(psutil.Process().memory_info().rss)

    @classmethod
    def get_diffusion_worker_cls(cls) -> str:
        # Called in the `mp` worker process once vllm-omni's `WorkerProc` is loaded and before
        # it starts its output thread: the one moment to replace that thread's body.
        from vllm_omni_images.platforms.cpu_patches import patch_worker_output_thread

        patch_worker_output_thread()
        return super().get_diffusion_worker_cls()

    @classmethod
    def import_kernels(cls) -> None:
        """vLLM's CPU kernels, or PyTorch's code in place of the activation ops its layers look
        up when the installed vLLM has none (`cpu_kernels.py`)."""
        from vllm_omni_images.platforms.cpu_kernels import register_missing_activation_ops

        super().import_kernels()
        register_missing_activation_ops()

    @classmethod
    def init_diffusion_worker_vllm_config(cls, vllm_config: Any) -> None:
        # Every diffusion worker (in-process or not) calls this before it builds the pipeline.
        cls.import_kernels()

    @classmethod
    def supports_torch_inductor(cls) -> bool:
        return False

    @classmethod
    def get_diffusion_attn_backend_cls(
        cls,
        selected_backend: str | None,
        head_size: int,
        allow_trtllm_default: bool = False,
    ) -> str:
        if selected_backend is not None and selected_backend.upper() not in (
            "TORCH_SDPA",
            "CPU_SDPA",
        ):
            raise ValueError(
                f"The {selected_backend} diffusion attention backend does not run on the CPU; "
                "the CPU platform runs TORCH_SDPA."
            )
        return CPU_SDPA_BACKEND
