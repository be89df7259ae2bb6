"""`CpuOmniPlatform`: vllm-omni's diffusion worker, model runner and pipelines on the CPU.

vllm-omni ships platforms for CUDA, ROCm, NPU, XPU and MUSA only; on a machine with none of
them it falls to `UnspecifiedOmniPlatform`, whose worker cannot start. This class is vLLM's own
`CpuPlatform` (memory, threads, gloo, no CUDA graphs) with vllm-omni's `OmniPlatform`
interface on top, answered for the CPU. vllm-omni finds it through its own extension point,
the `vllm_omni.platform_plugins` entry point `image_task` (`platforms/__init__.py`), in every
process that asks for `current_omni_platform`: the server and the `mp` executor's workers.

What it answers, and why each is needed (everything else is `CpuPlatform`'s or the interface's
default):

- `get_torch_device` / `get_device_count` / `set_device`: one "device", the CPU; the worker
  places the pipeline and its inputs on `get_torch_device(rank)`.
- `synchronize`, `empty_cache`, `reset_peak_memory_stats`: nothing to wait for or free on the
  CPU; the worker calls them around every load and forward pass.
- `is_available`, memory figures (`get_free_memory`, `get_device_memory`,
  `get_device_total_memory`, `max_memory_*`) from psutil: the worker reports and checks memory
  around its load and warm-up.
- `get_diffusion_attn_backend_cls`: `cpu_attention.CpuSDPABackend`. vllm-omni's attention
  layer dispatches `forward` by platform and has no CPU branch; its SDPA implementation is
  plain `torch.nn.functional.scaled_dot_product_attention`, which runs on the CPU unchanged.
- `supports_torch_inductor` False: vllm-omni then skips `torch.compile` (minutes on 2 cores).
- `get_diffusion_worker_cls`: vllm-omni's worker, after the one patch the `mp` executor's
  worker process needs (`cpu_patches.py`, which says why).

vllm-omni's offloading (`--enable-cpu-offload`, `--enable-layerwise-offload`) moves weights
between the CPU and a device on device streams; on the CPU there is nothing to offload to, and
this platform offers no streams for it.
"""

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
    """vLLM's CPU platform with vllm-omni's diffusion interface (see the module docstring)."""

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
