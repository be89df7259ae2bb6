"""The pixel budget (`memory_budget.py`): its default from the host's memory, the refusal of a
request that alone exceeds it, `PixelGate`'s order, and the batching engine under it (its
batches never exceed it; a request over it never reaches the runner)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import pytest

from tests.support.batching import serving
from tests.support.engines import req
from vllm_omni_images.engine import memory_budget
from vllm_omni_images.engine.base import ModelDefaults
from vllm_omni_images.engine.errors import RequestOverBudgetError
from vllm_omni_images.engine.memory_budget import (
    AUTO,
    MEGAPIXEL,
    PixelGate,
    auto_pixel_budget,
    check_within_budget,
    fitting_size,
    host_available_bytes,
    resolve_pixel_budget,
)
from vllm_omni_images.server.cli_args import ImageTaskArgs, add_image_cli_args

GiB = 2**30
IMAGE = 64 * 64
"""The pixels of one of `req`'s images."""


# Its default


def test_auto_is_a_share_of_the_available_memory_over_the_bytes_per_megapixel() -> None:
    assert auto_pixel_budget(500 * 2**20, 20 * GiB) == int(0.75 * 20 * 1024 / 500 * MEGAPIXEL)
    assert auto_pixel_budget(2**20, 10 * GiB, fraction=0.5) == 5 * 1024 * MEGAPIXEL
    assert auto_pixel_budget(10 * GiB, 1) == 1  # never none at all


def fake_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: dict[str, str]) -> None:
    """Point `host_available_bytes` at `files` (paths under a fake /proc and /sys/fs/cgroup)."""
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(memory_budget, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory_budget, "_CGROUP_V2", tmp_path / "v2")
    monkeypatch.setattr(memory_budget, "_CGROUP_V1", tmp_path / "v1")


MEMINFO = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n"


def test_the_host_memory_is_the_kernels_available_memory_within_a_cgroup_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_host(monkeypatch, tmp_path, {"meminfo": MEMINFO, "v2/memory.max": "max"})
    assert host_available_bytes() == 20000000 * 1024
    fake_host(
        monkeypatch,
        tmp_path,
        {"v2/memory.max": str(8 * GiB), "v2/memory.current": str(3 * GiB)},
    )
    assert host_available_bytes() == 5 * GiB  # a container's limit, less what it uses
    (tmp_path / "v2" / "memory.max").unlink()
    fake_host(
        monkeypatch,
        tmp_path,
        {"v1/memory.limit_in_bytes": str(2**63 - 4096), "v1/memory.usage_in_bytes": "5"},
    )
    assert host_available_bytes() == 20000000 * 1024  # cgroup v1's "no limit"
    fake_host(monkeypatch, tmp_path / "none", {})
    assert host_available_bytes() is None


def test_the_setting_resolves_to_a_budget(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=memory_budget.__name__)
    monkeypatch.setattr(memory_budget, "host_available_bytes", lambda: 10 * GiB)
    per_mp = 512 * 2**20
    measured = ModelDefaults(64, 64, 2, 16, bytes_per_megapixel=per_mp)
    assert resolve_pixel_budget(123, measured, "cpu") == 123
    assert resolve_pixel_budget(None, measured, "cpu") is None
    assert resolve_pixel_budget(AUTO, measured, "cpu") == auto_pixel_budget(per_mp, 10 * GiB)
    assert "Pixel budget: 15000000 pixels" in caplog.text
    assert resolve_pixel_budget(AUTO, measured, "cuda:0") is None  # a GPU's allocator raises
    unmeasured = ModelDefaults(64, 64, 2, 16)
    assert resolve_pixel_budget(AUTO, unmeasured, "cpu") is None
    assert "bytes per megapixel are unknown" in caplog.text
    assert resolve_pixel_budget(5, unmeasured, "cuda") == 5  # set, it holds anywhere
    monkeypatch.setattr(memory_budget, "host_available_bytes", lambda: None)
    assert resolve_pixel_budget(AUTO, measured, "cpu") is None
    with pytest.raises(ValueError, match="at least 1 pixel"):
        resolve_pixel_budget(0, measured, "cpu")


# A request over the budget


def test_a_request_within_the_budget_passes() -> None:
    check_within_budget(req(1, 2), 2 * IMAGE, 16)
    check_within_budget(req(*range(100)), None, 16)


def test_a_request_over_the_budget_is_told_the_largest_n_and_size_that_fit() -> None:
    request = req(1, 2, 3, 4, width=2048, height=2048)
    with pytest.raises(RequestOverBudgetError) as refused:
        check_within_budget(request, 12_000_000, 16)
    message = str(refused.value)
    assert "4 images of 2048x2048 are 16777216 pixels" in message
    assert "12000000 pixels, its --image-max-pixels-in-flight" in message
    assert "What fits: n=2 at 2048x2048 or n=4 at up to 1728x1728." in message
    assert refused.value.parameter == "n"
    assert 4 * 1728 * 1728 <= 12_000_000 < 4 * 1744 * 1744  # the largest multiple of 16


def test_one_image_over_the_budget_is_told_the_size_that_fits() -> None:
    with pytest.raises(RequestOverBudgetError) as refused:
        check_within_budget(req(1, width=1024, height=512), 256 * 128, 16)
    assert "one 1024x512 image is 524288 pixels" in str(refused.value)
    assert "What fits: a size of up to 256x128." in str(refused.value)  # its aspect kept
    assert refused.value.parameter == "size"
    with pytest.raises(RequestOverBudgetError) as nothing:
        check_within_budget(req(1, 2, width=64, height=64), 100, 16)
    assert "Ask for fewer or smaller images." in str(nothing.value)
    assert nothing.value.parameter == "size"


def test_the_fitting_size_keeps_the_aspect_in_the_models_multiples() -> None:
    assert fitting_size(4 * 1024 * 1024, 4, 2048, 2048, 16) == (1024, 1024)
    assert fitting_size(2 * 512 * 256, 2, 2048, 1024, 16) == (512, 256)
    assert fitting_size(10, 1, 64, 64, 16) is None


# PixelGate


async def test_the_gate_lets_in_first_come_first_served_within_the_budget() -> None:
    gate = PixelGate(4)
    await gate.acquire(3)
    later = [asyncio.create_task(gate.acquire(pixels)) for pixels in (2, 1)]
    await asyncio.sleep(0)
    # 1 would fit beside 3, but 2 came first: no overtaking, or large requests would starve.
    assert not any(task.done() for task in later) and gate.waiting == 2
    gate.release(3)
    await asyncio.gather(*later)
    assert gate.in_flight == 3 and gate.waiting == 0


async def test_a_request_over_the_budget_goes_alone() -> None:
    gate = PixelGate(4)
    await gate.acquire(1)
    alone = asyncio.create_task(gate.acquire(9))
    await asyncio.sleep(0)
    assert not alone.done()
    gate.release(1)
    await alone
    assert gate.in_flight == 9
    behind = asyncio.create_task(gate.acquire(1))
    await asyncio.sleep(0)
    assert not behind.done()
    gate.release(9)
    await behind


async def test_a_cancelled_wait_holds_nothing_and_lets_the_next_in() -> None:
    gate = PixelGate(4)
    await gate.acquire(2)
    big = asyncio.create_task(gate.acquire(4))
    small = asyncio.create_task(gate.acquire(2))
    await asyncio.sleep(0)
    assert not small.done()  # behind `big`
    big.cancel()
    await asyncio.gather(big, return_exceptions=True)
    await small
    assert gate.in_flight == 4 and gate.waiting == 0


async def test_a_withdrawn_owner_stops_waiting_and_a_held_request_gives_its_pixels_back() -> None:
    gate = PixelGate(2 * IMAGE)
    first, second = req(1, 2), req(3)
    async with gate.held(first):
        waiting = asyncio.create_task(gate.acquire(IMAGE, second))
        await asyncio.sleep(0)
        gate.withdraw(second)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert gate.in_flight == 2 * IMAGE and gate.waiting == 0
    assert gate.in_flight == 0


async def test_without_a_budget_the_gate_never_waits() -> None:
    gate = PixelGate(None)
    for _ in range(3):
        await asyncio.wait_for(gate.acquire(10**9), 1)
    assert gate.in_flight == 3 * 10**9


# The batching engine under a budget


async def test_batches_never_exceed_the_pixel_budget() -> None:
    async with serving(max_batch_size=8, max_pixels_in_flight=3 * IMAGE) as served:
        assert served.engine.max_pixels_in_flight == 3 * IMAGE
        blocker = await served.hold(req(0))
        queued = await served.submit_queued(req(1, 2), req(3), req(4), req(5, 6, 7), req(8))
        served.runner.gate.set()
        await asyncio.gather(blocker, *queued)
    seeds = [[s for r in batch for s in r.seeds] for batch in served.runner.batches]
    # (5, 6, 7) does not fit beside 4: it is skipped for 8, as a request over the batch size is
    assert seeds == [[0], [1, 2, 3], [4, 8], [5, 6, 7]]


async def test_a_request_over_the_budget_is_refused_before_it_is_queued() -> None:
    async with serving(max_pixels_in_flight=2 * IMAGE) as served:
        with pytest.raises(RequestOverBudgetError, match="What fits: n=2 at 64x64"):
            await served.submit(req(1, 2, 3))
        with pytest.raises(RequestOverBudgetError):
            served.client.check_admission(req(1, width=128, height=128))
        assert served.client.queued_images == 0 and served.runner.batches == []
        assert len(await served.submit(req(1, 2))) == 2


async def test_the_budget_caps_batches_below_a_larger_batch_size() -> None:
    async with serving(max_batch_size=16, max_pixels_in_flight=4 * IMAGE) as served:
        blocker = await served.hold(req(*range(4)))
        queued = await served.submit_queued(*(req(10 + i, 20 + i) for i in range(4)))
        served.runner.gate.set()
        await asyncio.gather(blocker, *queued)
    assert [sum(r.num_images for r in b) for b in served.runner.batches] == [4, 4, 4]


# The flag


def budget_flag(*flags: str) -> object:
    parser = argparse.ArgumentParser(prog="vllm serve")
    add_image_cli_args(parser)
    args = ImageTaskArgs.from_args(parser.parse_args(list(flags)))
    return args.batching_config().max_pixels_in_flight


def test_the_flag_takes_auto_none_or_pixels() -> None:
    assert budget_flag() == AUTO
    assert budget_flag("--image-max-pixels-in-flight", "0") is None
    assert budget_flag("--image-max-pixels-in-flight", "1000") == 1000
    assert budget_flag("--image-max-pixels-in-flight", "2048x2048") == 2048 * 2048
    assert budget_flag("--image-max-pixels-in-flight", "4x2048x2048") == 4 * 2048 * 2048
    for wrong in ("-1", "lots", "2x-2x-2", "x"):
        with pytest.raises(SystemExit):
            budget_flag("--image-max-pixels-in-flight", wrong)
