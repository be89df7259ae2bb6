"""The local image store behind `response_format: "url"`: names, expiry, clean-up, disk cap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.engines import FakeClock
from tests.support.waiting import until
from vllm_omni_images.images.file_store import NAME_PATTERN, LocalImageStore


@pytest.fixture
def clock() -> FakeClock:
    clock = FakeClock()
    clock.now = 1_000_000.0  # file times are wall-clock seconds
    return clock


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> LocalImageStore:
    return LocalImageStore(tmp_path / "images", ttl_s=60.0, max_bytes=1000, clock=clock)


async def test_an_image_is_served_as_written_with_its_media_type(store: LocalImageStore) -> None:
    name = await store.put(b"\x89PNG fake", "png")
    stored = await store.get(name)
    assert stored is not None and stored.path is not None
    assert stored.path.read_bytes() == b"\x89PNG fake"
    assert stored.media_type == "image/png" and stored.expires_in_s == 60.0
    webp = await store.get(await store.put(b"RIFF", "webp"))
    assert webp is not None and webp.media_type == "image/webp"


async def test_names_carry_at_least_128_random_bits(store: LocalImageStore) -> None:
    names = {await store.put(b"x", "png") for _ in range(50)}
    assert len(names) == 50
    for name in names:
        token = name.removesuffix(".png")
        assert len(token) == 32 and NAME_PATTERN.match(name)  # 32 base64url chars: 192 bits


async def test_an_expired_image_is_gone_before_and_after_the_sweep(
    store: LocalImageStore, clock: FakeClock
) -> None:
    name = await store.put(b"x", "png")
    clock.now += 59.0
    assert await store.get(name) is not None
    clock.now += 1.0
    assert await store.get(name) is None
    assert (store.directory / name).exists()  # the sweep has not run yet
    assert store.sweep() == [name]
    assert not (store.directory / name).exists()


@pytest.mark.parametrize(
    "name",
    [
        "../secret.png",
        "..%2F..%2Fetc%2Fpasswd",
        "/etc/passwd",
        "a" * 32 + ".png/../../x",
        "a" * 31 + ".png",
        "a" * 32 + ".gif",
        "a" * 32 + ".PNG",
        "." + "a" * 31 + ".png",
        "",
    ],
)
async def test_no_name_outside_the_pattern_is_looked_up(store: LocalImageStore, name: str) -> None:
    outside = store.directory.parent / "secret.png"
    outside.write_bytes(b"secret")
    assert await store.get(name) is None


async def test_over_the_disk_cap_the_oldest_images_go_first(store: LocalImageStore) -> None:
    names = [await store.put(bytes(300), "png") for _ in range(3)]
    assert all([await store.get(name) is not None for name in names])
    newest = await store.put(bytes(300), "png")  # 1200 bytes > 1000: the oldest goes
    assert await store.get(names[0]) is None and not (store.directory / names[0]).exists()
    assert all([await store.get(name) is not None for name in [*names[1:], newest]])


async def test_the_background_clean_up_removes_expired_files(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path, ttl_s=0.05, sweep_interval_s=0.02)
    name = await store.put(b"x", "png")
    cleanup = asyncio.create_task(store.run_cleanup())
    try:
        await until(lambda: not (tmp_path / name).exists(), "the clean-up to remove it")
    finally:
        cleanup.cancel()
