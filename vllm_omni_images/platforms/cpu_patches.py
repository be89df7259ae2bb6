"""The one change the CPU platform makes to vllm-omni's objects, for which vllm-omni offers no
hook: the `mp` worker's output thread (docs/architecture.md, "vllm-omni on the CPU")."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_PATCHED_MARK = "_vllm_omni_images_cpu"


def patch_worker_output_thread() -> None:
    """Replace the `mp` worker's output thread body with one without device streams; idempotent."""
    from vllm_omni.diffusion.worker.diffusion_worker import WorkerProc

    if getattr(WorkerProc._async_output_loop, _PATCHED_MARK, False):
        return
    setattr(_output_loop_without_streams, _PATCHED_MARK, True)
    WorkerProc._async_output_loop = _output_loop_without_streams


def _output_loop_without_streams(self: Any) -> None:
    """`WorkerProc._async_output_loop` for the CPU: the same messages, packed without a
    device stream (the tensors are already in host memory)."""
    from vllm_omni.diffusion.data import AsyncDiffusionOutput, AsyncOutputKind
    from vllm_omni.diffusion.ipc import pack_diffusion_output_shm

    while (item := self._async_output_queue.get()) is not None:
        output, async_output_id, _device_event = item
        try:
            pack_diffusion_output_shm(output)
            answer = AsyncDiffusionOutput(
                kind=AsyncOutputKind.OUTPUT_READY, async_output_id=async_output_id, output=output
            )
        except Exception:
            logger.exception("Packing the output %s failed; sending an error", async_output_id)
            answer = AsyncDiffusionOutput(
                kind=AsyncOutputKind.OUTPUT_READY,
                async_output_id=async_output_id,
                error="Packing the output into shared memory failed",
            )
        try:
            self._enqueue_result(answer)
        finally:
            with self._async_output_done:
                self._async_output_pending = max(0, self._async_output_pending - 1)
                self._async_output_done.notify_all()
