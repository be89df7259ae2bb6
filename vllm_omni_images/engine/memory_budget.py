"""An engine's memory budget: the image pixels it has in flight at once
(`--image-max-pixels-in-flight`), its default (`resolve_pixel_budget`), the refusal of a request
that alone exceeds it (`check_within_budget`), and `PixelGate`, which holds requests back until
their pixels fit. Importable without vLLM. The story: docs/architecture.md, "Memory: a budget
of pixels in flight"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

from vllm_omni_images.engine.errors import RequestOverBudgetError

if TYPE_CHECKING:  # the serve flags import this module in every vLLM process: nothing heavy
    from vllm_omni_images.engine.base import EngineRequest, ModelDefaults

logger = logging.getLogger(__name__)

AUTO: Final = "auto"
PixelBudgetSetting: TypeAlias = int | Literal["auto"] | None
"""A number of pixels, `auto` (`resolve_pixel_budget`), or `None`: no budget."""

MEGAPIXEL = 1_000_000
MEMORY_FRACTION = 0.75
"""The share of the memory available after the model is loaded that `auto` lets images take
(as vLLM's `--gpu-memory-utilization` leaves a share of a GPU): the rest is headroom for what
the measured slope leaves out (memory the allocator keeps after a call, ~0.4 GiB on the tiny
model; the slope's few percent from run to run; encoding answers) and for the host's other
work, which may grow after the budget is set."""

_MEMINFO = Path("/proc/meminfo")
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def host_available_bytes() -> int | None:
    """The memory this process may still take on the host: the kernel's `MemAvailable`, within
    its cgroup's limit (a container's) if one is set; `None` where neither can be read."""
    available: int | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    for limit_file, usage_file in (
        (_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current"),
        (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = limit_file.read_text().strip()
            if limit != "max" and int(limit) < 2**60:  # v1 says "no limit" with a huge number
                left = max(0, int(limit) - int(usage_file.read_text()))
                available = left if available is None else min(available, left)
    return available


def auto_pixel_budget(
    bytes_per_megapixel: float, available_bytes: int, fraction: float = MEMORY_FRACTION
) -> int:
    """The pixels whose images take `fraction` of `available_bytes`, at `bytes_per_megapixel`
    (the peak memory one more megapixel in a pipeline call adds, measured for the model)."""
    return max(1, int(fraction * available_bytes / bytes_per_megapixel * MEGAPIXEL))


def resolve_pixel_budget(
    setting: PixelBudgetSetting, defaults: ModelDefaults, device: str
) -> int | None:
    """The budget an engine keeps (`None`: none) for the flag's `setting`, serving a model of
    `defaults` on `device`. `auto`, where the model runs in the host's memory (the CPU) and its
    bytes per megapixel are known (its folder's `vllm_omni_images.json`), is
    `auto_pixel_budget` of the memory available now (the model loaded); elsewhere none: a
    GPU's allocator raises, and its batches are halved."""
    if setting != AUTO:
        if setting is not None and setting < 1:
            raise ValueError(f"a pixel budget must be at least 1 pixel, 'auto' or None: {setting}")
        return setting
    bytes_per_megapixel = defaults.bytes_per_megapixel
    if not device.startswith("cpu"):
        logger.info("No pixel budget (--image-max-pixels-in-flight auto): the model is on a GPU.")
        return None
    available = host_available_bytes()
    if bytes_per_megapixel is None or available is None:
        logger.warning(
            "No pixel budget: %s; concurrent large requests may exceed the host's memory. Set "
            '--image-max-pixels-in-flight (docs/performance.md, "Memory (issue 31)", says how to '
            "measure it), or bytes_per_megapixel in the model folder's vllm_omni_images.json.",
            "the host's available memory cannot be read"
            if available is None
            else "this model's bytes per megapixel are unknown",
        )
        return None
    budget = auto_pixel_budget(bytes_per_megapixel, available)
    logger.info(
        "Pixel budget: %d pixels in flight (%.1f MP: %g of the %.1f GiB available, at %.0f MiB "
        "per megapixel); --image-max-pixels-in-flight sets another.",
        budget,
        budget / MEGAPIXEL,
        MEMORY_FRACTION,
        available / 2**30,
        bytes_per_megapixel / 2**20,
    )
    return budget


def request_pixels(request: EngineRequest) -> int:
    """The pixels of all of a request's images."""
    return request.num_images * request.width * request.height


def check_within_budget(request: EngineRequest, budget: int | None, size_multiple: int) -> None:
    """Raise `RequestOverBudgetError`, which says the largest `n` and size that fit, if the
    request's images alone are more pixels than `budget`."""
    if budget is None or request_pixels(request) <= budget:
        return
    width, height, n = request.width, request.height, request.num_images
    raise RequestOverBudgetError(
        n,
        (width, height),
        budget,
        fitting_n=budget // (width * height),
        fitting_size=fitting_size(budget, n, width, height, size_multiple),
    )


def fitting_size(
    budget: int, num_images: int, width: int, height: int, size_multiple: int
) -> tuple[int, int] | None:
    """The largest size of `width`'s aspect (in multiples of `size_multiple`) of which
    `num_images` images fit in `budget`; `None` if not even the smallest does."""
    scale = math.sqrt(budget / (num_images * width * height))
    fit_width = int(width * scale) // size_multiple * size_multiple
    fit_height = int(height * scale) // size_multiple * size_multiple
    if fit_width < size_multiple or fit_height < size_multiple:
        return None
    return fit_width, fit_height


class PixelGate:
    """Pixels in flight within a budget, first come first served, on one event loop: `acquire`
    waits until a request's pixels fit beside those in flight (one that alone exceeds the
    budget goes when nothing else is in flight), so that a large request is never overtaken
    for ever by smaller ones."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.in_flight = 0
        self._waiting: deque[tuple[int, asyncio.Future[None], object]] = deque()

    @property
    def waiting(self) -> int:
        """Requests held back."""
        return sum(1 for _, future, _ in self._waiting if not future.done())

    @contextlib.asynccontextmanager
    async def held(self, request: EngineRequest) -> AsyncIterator[None]:
        """Hold the request's pixels while the body runs, once they fit (`acquire`);
        `withdraw(request)` ends the wait (with `CancelledError`)."""
        pixels = request_pixels(request)
        await self.acquire(pixels, request)
        try:
            yield
        finally:
            self.release(pixels)

    def withdraw(self, owner: object) -> None:
        """End the wait of `owner`'s `acquire`, if it waits: it raises `CancelledError`."""
        for _, future, waiting in self._waiting:
            if waiting is owner:
                future.cancel()

    def _fits(self, pixels: int) -> bool:
        return self.budget is None or not self.in_flight or self.in_flight + pixels <= self.budget

    async def acquire(self, pixels: int, owner: object = None) -> None:
        """Wait until `pixels` fit beside those in flight and none wait before them, then hold
        them until `release` (a cancelled wait holds nothing)."""
        if not self._waiting and self._fits(pixels):
            self.in_flight += pixels
            return
        entry = (pixels, asyncio.get_running_loop().create_future(), owner)
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.release(pixels)  # let in just as it was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._let_in()  # those behind it may fit now
            raise

    def release(self, pixels: int) -> None:
        """Give back what `acquire` held, and let in those now at the head that fit."""
        self.in_flight -= pixels
        self._let_in()

    def _let_in(self) -> None:
        while self._waiting:
            pixels, future, _ = self._waiting[0]
            if not future.done():  # (a cancelled one leaves)
                if not self._fits(pixels):
                    return
                self.in_flight += pixels
                future.set_result(None)
            self._waiting.popleft()
