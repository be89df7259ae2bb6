"""`response_format: "url"` through the official `openai` SDK, in-process on the tiny engine."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tests.support.images import FAST_STEPS
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

from .conftest import AppFactory
from .helpers import http_client, sdk_client
from .helpers import sdk_generate as generate

KEY = "url-test-key"
NO_SUCH_IMAGE = {
    "error": {
        "message": "No such image: it never existed or its URL has expired.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
}


@pytest.fixture
async def served(
    make_app: AppFactory, tiny_runner: DiffusersRunner
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    """The SDK with the API key, and a bare HTTP client (no key) on the same app."""
    # Long enough that a URL outlives a loaded machine's generate-then-fetch (0.5 s did not).
    app = await make_app(tiny_runner, ["--api-key", KEY, "--image-url-ttl", "30"])
    async with sdk_client(app, KEY) as sdk, http_client(app) as bare:
        yield sdk, bare


async def test_a_url_serves_the_same_bytes_as_b64_json_without_the_api_key(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, bare = served
    linked = await generate(sdk, response_format="url")
    inline = await generate(sdk, response_format="b64_json")
    assert linked.data is not None and inline.data is not None
    url = linked.data[0].url
    assert url is not None and url.startswith("http://test/images/files/")
    assert linked.data[0].b64_json is None
    fetched = await bare.get(url)  # no Authorization header, as a browser would
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(inline.data[0].b64_json or "")
    # HEAD, as link checkers and caches send it: GET's headers, no body.
    head = await bare.head(url)
    assert head.status_code == 200
    assert head.headers["content-type"] == "image/png"
    assert head.headers["content-length"] == str(len(fetched.content))
    assert (await bare.post("/v1/images/generations", json={"prompt": "x"})).status_code == 401


async def test_each_of_n_images_gets_its_own_url_in_the_asked_format(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    sdk, bare = served
    result = await generate(sdk, n=2, response_format="url", output_format="webp")
    assert result.data is not None
    urls = [item.url or "" for item in result.data]
    assert len(set(urls)) == 2 and all(url.endswith(".webp") for url in urls)
    for url in urls:
        response = await bare.get(url)
        assert response.headers["content-type"] == "image/webp"


async def test_an_expired_url_is_a_404(make_app: AppFactory, tiny_runner: DiffusersRunner) -> None:
    app = await make_app(tiny_runner, ["--api-key", KEY, "--image-url-ttl", "0.5"])
    async with sdk_client(app, KEY) as sdk, http_client(app) as bare:
        result = await generate(sdk, response_format="url")
        assert result.data is not None and result.data[0].url is not None
        await asyncio.sleep(0.6)  # past --image-url-ttl 0.5
        response = await bare.get(result.data[0].url)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "NotFoundError"
    assert response.json() == NO_SUCH_IMAGE


@pytest.mark.parametrize(
    "path",
    [
        "/images/files/..%2F..%2F..%2Fetc%2Fpasswd",
        "/images/files/%2e%2e%2fsecret.png",
        "/images/files/" + "A" * 32 + ".png",  # well-formed, never issued
        "/images/files/" + "A" * 32 + ".png%00.txt",
        "/images/files/a/b.png",  # a name with a slash: OpenAI's shape too, not FastAPI's
        "/images/files/",
    ],
)
async def test_names_that_were_never_issued_are_404(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient], path: str
) -> None:
    _, bare = served
    response = await bare.get(path)
    assert response.status_code == 404
    assert response.json() == NO_SUCH_IMAGE
    assert (await bare.head(path)).status_code == 404


async def test_urls_carry_the_root_path(make_app: AppFactory, tiny_runner: DiffusersRunner) -> None:
    app = await make_app(tiny_runner, ["--root-path", "/proxy"])
    async with sdk_client(app, "none") as sdk, http_client(app) as http:
        result = await generate(sdk, response_format="url")
        assert result.data is not None and result.data[0].url is not None
        url = result.data[0].url
        assert url.startswith("http://test/proxy/images/files/")
        # The proxy in front strips /proxy before the request reaches this server.
        fetched = await http.get(url.replace("/proxy", "", 1))
        assert fetched.status_code == 200


async def test_a_path_or_method_no_route_serves_is_answered_in_openai_shape(
    served: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    """Starlette's own 404 and 405 (vLLM's app answered them `{"detail": "Not Found"}`)."""
    _, bare = served
    response = await bare.get("/images/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404
    response = await bare.post("/images/files/" + "A" * 32 + ".png")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}


@pytest.mark.parametrize(
    ("setting", "inline", "linked"),
    [("auto", ["tiny-qwen-image"], ["dall-e-2"]),
     ("b64_json", ["tiny-qwen-image", "dall-e-2"], []),
     ("url", [], ["tiny-qwen-image", "dall-e-2"])],
)  # fmt: skip
async def test_the_default_response_format_flag(
    make_app: AppFactory, tiny_runner: DiffusersRunner, setting, inline, linked
) -> None:
    """`--image-default-response-format` answers a request that names no format; `auto`
    (the default) is OpenAI's rule by the served name the request uses."""
    flags = ["--served-model-name", "tiny-qwen-image", "dall-e-2"]
    app = await make_app(tiny_runner, [*flags, "--image-default-response-format", setting])
    async with sdk_client(app) as sdk:
        for name in inline + linked:
            result = await sdk.images.generate(
                model=name, prompt="a fox", size="64x64", extra_body=FAST_STEPS
            )
            assert result.data is not None
            [item] = result.data
            assert (item.b64_json is not None, item.url is not None) == (
                name in inline,
                name in linked,
            )
