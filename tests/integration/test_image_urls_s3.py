"""`response_format: "url"` with the S3-compatible store (`--image-store-url`), in-process on
the tiny engine, against a real S3 API server: replicas sharing a bucket answer each other's
URLs, presigned URLs, expiry, and a store that goes away and comes back."""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import urlsplit

import httpx
import pytest
from openai.types import ImagesResponse

from tests.support.images import FAST_STEPS
from tests.support.s3 import S3Server, wait_until_up
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

from .conftest import AppFactory
from .helpers import assert_openai_error, http_client, metric_value, sdk_client
from .helpers import sdk_generate as generate

KEY = "s3-test-key"


def url_of(response: ImagesResponse) -> str:
    assert response.data is not None and response.data[0].url is not None
    return response.data[0].url


def path_of(url: str) -> str:
    return urlsplit(url).path


@pytest.fixture
def bucket(s3_env: S3Server) -> str:
    return s3_env.new_bucket()


async def replica(make_app: AppFactory, runner: DiffusersRunner, bucket: str, *flags: str):
    return await make_app(
        runner, ["--api-key", KEY, "--image-store-url", f"s3://{bucket}/urls", *flags]
    )


async def test_a_url_made_by_one_replica_is_answered_by_another(
    make_app: AppFactory, tiny_runner: DiffusersRunner, bucket: str, s3_env: S3Server
) -> None:
    first = await replica(make_app, tiny_runner, bucket)
    second = await replica(make_app, tiny_runner, bucket)
    async with sdk_client(first, KEY) as sdk, http_client(second) as elsewhere:
        linked = await generate(sdk, response_format="url")
        inline = await generate(sdk, response_format="b64_json")
        fetched = await elsewhere.get(path_of(url_of(linked)))  # no API key
    assert url_of(linked).startswith("http://test/images/files/")
    assert fetched.status_code == 200, fetched.text
    assert fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(inline.data[0].b64_json or "")  # type: ignore[index]
    [key] = s3_env.keys(bucket)
    assert key == "urls/" + path_of(url_of(linked)).rsplit("/", 1)[1]


async def test_behind_a_router_urls_start_with_the_public_base_and_any_replica_answers(
    make_app: AppFactory, tiny_runner: DiffusersRunner, bucket: str
) -> None:
    """`--image-url-base`: for a router that does not pass the client's Host on, links point
    at the address (an ingress) that reaches every replica's /images/files/."""
    base = "https://images.example.com/gen"
    first = await replica(make_app, tiny_runner, bucket, "--image-url-base", base + "/")
    second = await replica(make_app, tiny_runner, bucket)
    async with sdk_client(first, KEY) as sdk, http_client(second) as elsewhere:
        url = url_of(await generate(sdk, response_format="url"))
        assert url.startswith(f"{base}/images/files/")
        fetched = await elsewhere.get(url.removeprefix(base))
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"


async def test_presigned_urls_come_from_the_store_and_need_no_key(
    make_app: AppFactory, tiny_runner: DiffusersRunner, bucket: str, s3_env: S3Server
) -> None:
    app = await replica(make_app, tiny_runner, bucket, "--image-urls", "presigned")
    async with sdk_client(app, KEY) as sdk, http_client(app) as bare:
        response = await generate(sdk, response_format="url", n=2, output_format="webp")
        urls = [image.url or "" for image in response.data or []]
        async with httpx.AsyncClient() as browser:  # neither API key nor AWS credentials
            fetched = [await browser.get(url) for url in urls]
        name = path_of(urls[0]).rsplit("/", 1)[1]
        through_server = await bare.get(f"/images/files/{name}")
    assert len(set(urls)) == 2
    assert all(url.startswith(f"{s3_env.endpoint_url}/{bucket}/urls/") for url in urls)
    assert all("X-Amz-Expires=3600" in url for url in urls)
    assert [(r.status_code, r.headers["content-type"]) for r in fetched] == [
        (200, "image/webp")
    ] * 2
    assert through_server.status_code == 200 and through_server.content == fetched[0].content


async def test_a_url_expires_after_the_ttl_on_every_replica(
    make_app: AppFactory, tiny_runner: DiffusersRunner, bucket: str
) -> None:
    first = await replica(make_app, tiny_runner, bucket, "--image-url-ttl", "1")
    second = await replica(make_app, tiny_runner, bucket, "--image-url-ttl", "1")
    async with sdk_client(first, KEY) as sdk, http_client(second) as elsewhere:
        path = path_of(url_of(await generate(sdk, response_format="url")))
        assert (await elsewhere.get(path)).status_code == 200
        await asyncio.sleep(1.1)
        gone = await elsewhere.get(path)
    assert_openai_error(gone, 404)


async def test_a_store_outage_is_a_503_naming_the_cause_and_the_server_recovers(
    make_app: AppFactory, tiny_runner: DiffusersRunner, bucket: str, s3_env: S3Server
) -> None:
    app = await replica(make_app, tiny_runner, bucket)
    async with sdk_client(app, KEY) as sdk, http_client(app) as bare:
        before = path_of(url_of(await generate(sdk, response_format="url")))
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"prompt": "a fox", "size": "64x64", "response_format": "url", **FAST_STEPS}
        s3_env.stop()
        try:
            refused = await bare.post("/v1/images/generations", json=body, headers=headers)
            unreadable = await bare.get(before)
            inline = await generate(sdk, response_format="b64_json")  # needs no store
        finally:
            s3_env.start()
            wait_until_up(s3_env)
        again = await bare.get(before)
        after = await bare.post("/v1/images/generations", json=body, headers=headers)
        metrics = (await bare.get("/metrics")).text
    for failed in (refused, unreadable):
        error = assert_openai_error(failed, 503)
        assert error["type"] == "ServiceUnavailableError"
        assert f"s3://{bucket}/urls/" in error["message"]
        assert "Could not connect" in error["message"]
    assert "b64_json" in refused.json()["error"]["message"]
    assert inline.data is not None and inline.data[0].b64_json
    assert again.status_code == 200 and again.headers["content-type"] == "image/png"
    assert after.status_code == 200
    new_url = after.json()["data"][0]["url"]
    assert new_url.startswith("http://test/images/files/") and path_of(new_url) != before
    assert metric_value(metrics, "vllm:image_requests_total", outcome="unavailable") >= 1


def test_an_unreachable_bucket_stops_the_start_up_before_the_model_loads(
    serve_parser, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_omni_images.server import launcher

    errors: list[str] = []
    monkeypatch.setattr(launcher.logger, "error", lambda text, *args: errors.append(text % args))
    monkeypatch.setattr(launcher, "load_engine", None)  # must not be reached
    args = serve_parser.parse_args(
        ["tiny-qwen-image", "--task", "image", "--image-store-url", "s3://no-such-bucket/x"]
    )
    args.model = args.model_tag
    with pytest.raises(SystemExit) as exited:
        launcher.run_image_server_cli(args)
    assert exited.value.code == 1
    [line] = errors
    assert line.startswith("Cannot serve tiny-qwen-image: the image store (s3://no-such-bucket/x/)")
    assert "could not reach the bucket" in line
