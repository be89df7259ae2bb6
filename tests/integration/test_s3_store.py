"""`S3ImageStore` against a real S3 API server (moto's server mode): what it stores, where,
for how long, signed URLs, and a store that goes away and comes back."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.engines import FakeClock
from tests.support.s3 import S3Server, wait_until_up
from vllm_omni_images.images.file_store import NAME_PATTERN, ImageStoreError
from vllm_omni_images.images.s3_store import S3ImageStore, S3Location

PNG = b"\x89PNG\r\n\x1a\n fake image"


@pytest.fixture
def clock() -> FakeClock:
    clock = FakeClock()
    clock.now = time.time()  # wall-clock seconds: the store's own times are the real ones
    return clock


def store_in(bucket: str, clock: FakeClock, **options: object) -> S3ImageStore:
    location = S3Location.parse(f"s3://{bucket}/served/images")
    return S3ImageStore(location, ttl_s=60.0, clock=clock, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://images", "images", ""),
        ("s3://images/", "images", ""),
        ("s3://images/a/b/", "images", "a/b/"),
        ("s3://images/a/b", "images", "a/b/"),
    ],
)
def test_store_urls_name_a_bucket_and_a_prefix(url: str, bucket: str, prefix: str) -> None:
    assert S3Location.parse(url) == S3Location(bucket, prefix)


@pytest.mark.parametrize(
    "url", ["images", "s3://", "http://host/bucket", "gs://bucket", "s3://b/p?x=1"]
)
def test_anything_but_an_s3_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="not an S3 URL"):
        S3Location.parse(url)


async def test_an_image_is_stored_under_the_prefix_and_read_back(
    s3_env: S3Server, clock: FakeClock
) -> None:
    bucket = s3_env.new_bucket()
    store = store_in(bucket, clock)
    await store.check()
    name = await store.put(PNG, "png")
    assert NAME_PATTERN.match(name)
    assert s3_env.keys(bucket) == [f"served/images/{name}"]
    head = s3_env.client().head_object(Bucket=bucket, Key=f"served/images/{name}")
    assert head["ContentType"] == "image/png"
    stored = await store.get(name)
    assert stored is not None and stored.data == PNG and stored.path is None
    assert stored.media_type == "image/png" and stored.expires_in_s == pytest.approx(60.0, abs=0.01)
    assert await store.url_of(name) is None  # the server answers its own URLs by default
    # Another server's store on the same bucket and prefix reads it too.
    assert (await store_in(bucket, clock).get(name)) is not None


@pytest.mark.parametrize("name", ["../x.png", "a" * 32 + ".gif", "a" * 31 + ".png", ""])
async def test_no_name_outside_the_pattern_is_looked_up(
    s3_env: S3Server, clock: FakeClock, name: str
) -> None:
    bucket = s3_env.new_bucket()
    s3_env.client().put_object(Bucket=bucket, Key=f"served/images/{name}", Body=b"secret")
    assert await store_in(bucket, clock).get(name) is None


async def test_an_image_expires_with_its_writers_ttl_and_the_sweep_deletes_it(
    s3_env: S3Server, clock: FakeClock
) -> None:
    bucket = s3_env.new_bucket()
    store = store_in(bucket, clock)
    old, fresh = await store.put(PNG, "png"), await store.put(PNG, "webp")
    other = s3_env.client()
    other.put_object(Bucket=bucket, Key="elsewhere/" + old, Body=b"not ours")
    other.put_object(Bucket=bucket, Key=f"served/images/deeper/{old}", Body=b"not ours")
    clock.now += 61.0
    assert await store.get(old) is None and await store.get(fresh) is None  # past the TTL
    # The sweep goes by the store's own times: only `old` is older than the TTL there.
    s3_env.backdate(bucket, f"served/images/{old}", 61.0)
    clock.now -= 61.0
    assert await store.sweep() == [old]
    assert sorted(s3_env.keys(bucket)) == sorted(
        ["elsewhere/" + old, f"served/images/deeper/{old}", f"served/images/{fresh}"]
    )
    assert await store.get(fresh) is not None


async def test_a_presigned_url_serves_the_image_without_credentials_until_the_ttl(
    s3_env: S3Server, clock: FakeClock
) -> None:
    bucket = s3_env.new_bucket()
    store = store_in(bucket, clock, presigned_urls=True)
    name = await store.put(PNG, "jpeg")
    url = await store.url_of(name)
    assert url is not None and url.startswith(s3_env.endpoint_url)
    assert "X-Amz-Expires=60" in url and "X-Amz-Signature=" in url
    async with httpx.AsyncClient() as bare:  # no AWS credentials, as a browser
        fetched = await bare.get(url)
        assert fetched.status_code == 200 and fetched.content == PNG
        assert fetched.headers["content-type"] == "image/jpeg"
        # S3 refuses the signature past X-Amz-Expires (moto does not check it); the clean-up
        # deletes the object then, so the URL is dead on any S3-compatible store. 61 s: the
        # clock was read before the put, so 60 s older is not always past the TTL.
        s3_env.backdate(bucket, f"served/images/{name}", 61.0)
        assert await store.sweep() == [name]
        assert (await bare.get(url)).status_code == 404


def test_a_presigned_url_cannot_outlive_sigv4s_seven_days(clock: FakeClock) -> None:
    with pytest.raises(ImageStoreError, match="7 days"):
        S3ImageStore(
            S3Location("b", ""), ttl_s=8 * 86400, presigned_urls=True, client=object(), clock=clock
        )


async def test_a_missing_bucket_is_named_at_the_check(s3_env: S3Server, clock: FakeClock) -> None:
    with pytest.raises(ImageStoreError, match=r"s3://no-such-bucket-here/.*could not reach"):
        await store_in("no-such-bucket-here", clock).check()


async def test_a_store_that_goes_away_fails_with_the_cause_and_is_used_again_when_back(
    s3_env: S3Server, clock: FakeClock
) -> None:
    bucket = s3_env.new_bucket()
    store = store_in(bucket, clock)
    before = await store.put(PNG, "png")
    s3_env.stop()
    try:
        with pytest.raises(ImageStoreError, match="could not store an image: Could not connect"):
            await store.put(PNG, "png")
        with pytest.raises(ImageStoreError, match="could not read an image"):
            await store.get(before)
        with pytest.raises(ImageStoreError, match="could not list expired images"):
            await store.sweep()
    finally:
        s3_env.start()
        wait_until_up(s3_env)
    stored = await store.get(before)
    assert stored is not None and stored.data == PNG
    assert await store.get(await store.put(PNG, "png")) is not None
