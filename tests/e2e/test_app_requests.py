"""Open WebUI, LibreChat and n8n, which are too large to install in a test: the requests each
sends to an OpenAI-compatible image API, reproduced field by field from its source, and its
answer read the way it reads it.

Each test's docstring names the app's file, the commit read and the lines. The shared server
serves `tiny-qwen-image` also as `dall-e-2`, `dall-e-3` and `gpt-image-1` (`conftest.py`), the
names these apps use by default. A size or step count other than the app's own is used only
where the app lets its user or admin choose it (each test says which setting)."""

from __future__ import annotations

import base64
import io
import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from tests.support.images import FAST_STEPS, png

from .live_server import AUTH

pytestmark = pytest.mark.e2e

PROMPT = "a lighthouse at dawn"
IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN = "^gpt-image"
"""Open WebUI's default (backend/open_webui/config.py): a model name it matches is sent no
`response_format`; every other name is sent `"b64_json"`."""


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as http:
        yield http


def opened(data: bytes, media_type: str) -> Image.Image:
    """The image in `data`, checked to be what `media_type` (as the app labels it) says."""
    image = Image.open(io.BytesIO(data))
    assert media_type == f"image/{image.format.lower() if image.format else ''}", media_type
    return image


def post_edit(
    client: httpx.Client, server: str, data: dict[str, str], files: list[tuple[str, Any]]
) -> httpx.Response:
    """A multipart edit, as each app posts it: its form fields and files, and only the
    `Authorization` header (the multipart Content-Type is the HTTP library's)."""
    return client.post(f"{server}/v1/images/edits", data=data, files=files, headers=AUTH)


def origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


# --- Open WebUI (open-webui/open-webui at 02530d501461ce58ab06231d7c2ef2024a141ddf) ----------

OPEN_WEBUI_HEADERS = {**AUTH, "Content-Type": "application/json"}
"""images.py:617-620. `ENABLE_FORWARD_USER_INFO_HEADERS` adds X-OpenWebUI-User-* headers."""


def open_webui_generation_body(
    image_generation_model: str, image_size: str, params: dict[str, object]
) -> dict[str, object]:
    """images.py:629-647 for a chat's request (`CreateImageForm(prompt=...)`: n 1, no size):
    the model is `IMAGE_GENERATION_MODEL` or `dall-e-2` (get_image_model, :201-204), the size
    the admin's `IMAGE_SIZE`, and the admin's `IMAGES_OPENAI_API_PARAMS` merged last."""
    return {
        "model": image_generation_model or "dall-e-2",
        "prompt": PROMPT,
        "n": 1,
        **({"size": image_size} if image_size else {}),
        **(
            {}
            if re.match(IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN, image_generation_model)
            else {"response_format": "b64_json"}
        ),
        **params,
    }


def open_webui_reads(
    client: httpx.Client, answer: httpx.Response, headers: dict[str, str]
) -> list[tuple[bytes, str]]:
    """images.py:660-671 and get_image_data (:479-514): a `url` is fetched with the request's
    headers but Content-Type (the Bearer key too) and must answer an image/* type; otherwise
    `b64_json` is decoded and labelled image/png. (Before the fetch Open WebUI's SSRF check
    runs: see test_open_webui_fetches_a_url_answer_with_its_bearer_key.)"""
    answer.raise_for_status()
    images = []
    for image in answer.json()["data"]:
        if url := image.get("url"):
            fetched = client.get(
                url, headers={k: v for k, v in headers.items() if k != "Content-Type"}
            )
            fetched.raise_for_status()
            media_type = fetched.headers.get("content-type", "")
            assert media_type.split("/")[0] == "image", media_type
            images.append((fetched.content, media_type))
        else:
            images.append((base64.b64decode(image["b64_json"]), "image/png"))
    return images


def test_open_webui_generates_with_its_default_model_name(client, server):
    """Open WebUI's image settings as installed (`IMAGE_GENERATION_MODEL` empty, so
    `dall-e-2`; `response_format: "b64_json"`), with two admin settings: Image Size 64x64 and
    `IMAGES_OPENAI_API_PARAMS` (the "additional parameters" JSON, merged into the body last,
    images.py:646) carrying `num_inference_steps`. images.py:591-672."""
    body = open_webui_generation_body("", "64x64", dict(FAST_STEPS))
    assert body == {
        "model": "dall-e-2",
        "prompt": PROMPT,
        "n": 1,
        "size": "64x64",
        "response_format": "b64_json",
        **FAST_STEPS,
    }
    answer = client.post(f"{server}/v1/images/generations", json=body, headers=OPEN_WEBUI_HEADERS)
    [(data, media_type)] = open_webui_reads(client, answer, OPEN_WEBUI_HEADERS)
    assert opened(data, media_type).size == (64, 64)


def test_open_webui_with_a_gpt_image_model_sends_no_response_format(client, server):
    """`IMAGE_GENERATION_MODEL` `gpt-image-1` matches `^gpt-image`, so Open WebUI sends no
    `response_format` (images.py:637-645) and expects `b64_json`: a `url` answer would be
    fetched through its SSRF check, which refuses a server on a private address."""
    body = open_webui_generation_body("gpt-image-1", "64x64", dict(FAST_STEPS))
    assert "response_format" not in body
    answer = client.post(f"{server}/v1/images/generations", json=body, headers=OPEN_WEBUI_HEADERS)
    assert answer.status_code == 200, answer.text
    assert [set(image) & {"b64_json", "url"} for image in answer.json()["data"]] == [{"b64_json"}]
    [(data, media_type)] = open_webui_reads(client, answer, OPEN_WEBUI_HEADERS)
    assert opened(data, media_type).size == (64, 64)


def test_open_webui_fetches_a_url_answer_with_its_bearer_key(client, server):
    """An admin's `IMAGES_OPENAI_API_PARAMS` `{"response_format": "url"}` overrides the
    `b64_json` Open WebUI sends (the params merge last, images.py:646); the URL is then
    fetched with the API key's `Authorization` header (:662-666), which the image route does
    not need and must not refuse, and its content-type must be image/* (:501).

    Before that fetch Open WebUI runs `validate_url` (retrieval/web/utils.py:77-120), which
    refuses a URL whose host resolves to any non-global address unless the admin sets
    `ENABLE_LOCAL_WEB_FETCH` (:105-115); the URL names the host the app called, so a server
    Open WebUI reaches on a private address needs that setting, or `--image-url-base` with a
    public name, or `b64_json` (the default above)."""
    params = {"response_format": "url", **FAST_STEPS}
    body = open_webui_generation_body("", "64x64", params)
    answer = client.post(f"{server}/v1/images/generations", json=body, headers=OPEN_WEBUI_HEADERS)
    assert answer.status_code == 200, answer.text
    [image] = answer.json()["data"]
    assert origin(image["url"]) == origin(server)
    [(data, media_type)] = open_webui_reads(client, answer, OPEN_WEBUI_HEADERS)
    assert opened(data, media_type).size == (64, 64)


@pytest.mark.parametrize(
    ("caller", "image_field", "image_edit_model", "fields"),
    [
        # The chat's edit (utils/middleware.py, chat_image_generation_handler) and the
        # edit_image tool pass a list of images: each goes as `image[]`, no n, no background.
        ("chat", "image[]", "dall-e-2", {}),
        # POST /api/v1/images/edit with one image as a string: `image`, with its n and
        # background; IMAGE_EDIT_MODEL gpt-image-1 sends no response_format.
        ("api", "image", "gpt-image-1", {"n": "1", "background": "opaque"}),
    ],
)
def test_open_webui_edits(client, server, caller, image_field, image_edit_model, fields):
    """images.py:889-1043 (image_edits, the `openai` engine) with `IMAGE_EDIT_SIZE` 64x64:
    multipart `model` (`IMAGE_EDIT_MODEL`), `prompt`, `n`/`size`/`background` when set,
    `response_format: b64_json` unless the model matches `^gpt-image` (:974-987), the images
    as `image` (one string) or `image[]` (a list, :991-1000) named `<uuid>.png`, and only the
    `Authorization` header (:967-969). No extra parameters exist for edits, so the tiny
    model's default steps run."""
    data = {
        "model": image_edit_model,
        "prompt": PROMPT,
        **({"n": fields["n"]} if "n" in fields else {}),
        "size": "64x64",
        **({"background": fields["background"]} if "background" in fields else {}),
        **(
            {}
            if re.match(IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN, image_edit_model)
            else {"response_format": "b64_json"}
        ),
    }
    files = [(image_field, (f"{uuid.uuid4()}.png", png(), "image/png"))]
    answer = post_edit(client, server, data, files)
    [(image, media_type)] = open_webui_reads(client, answer, AUTH)
    assert opened(image, media_type).size == (64, 64), caller


# --- LibreChat (danny-avila/LibreChat) --------------------------------------------------------

LIBRECHAT_JSON_HEADERS = {
    **AUTH,
    "Content-Type": "application/json",
    "Accept": "application/json",
}
"""The `openai` Node SDK's headers (it adds User-Agent and X-Stainless-* headers too)."""


@pytest.mark.parametrize(
    "compatibility_response_format",
    [
        # OpenAIImageTools.js at 8731432f64aaaf70633b0a60922ee8182baa630d
        False,
        # a later version in the index adds response_format: "b64_json" whenever
        # IMAGE_GEN_OAI_BASEURL is set (the index does not expose its commit)
        True,
    ],
)
def test_librechat_image_gen_oai(client, server, compatibility_response_format):
    """The agents' `image_gen_oai` tool with its defaults, api/app/clients/tools/structured/
    OpenAIImageTools.js at 8731432f, lines 81 and 110-224: `model` from `IMAGE_GEN_OAI_MODEL`
    or `gpt-image-1`, `n` 1, `background`/`quality`/`size` `auto`, `output_format` png (the
    app's `imageOutputType`), `output_compression` left out for png (`undefined` is dropped
    by JSON). The tool's schema offers the model only `auto`, 1024x1024, 1536x1024 and
    1024x1536, so `auto` (the model's default size) is the cheapest it can send. It reads
    `resp.data[0].b64_json` only (:197) and shows it as `data:image/png;base64,...`.

    A later OpenAIImageTools.js in the index (commit not exposed) also records the answer's
    `usage.input_tokens` and `usage.output_tokens` with `spendTokens` for balances (its
    recordTokenUsage); earlier ones leave `// TODO: handle cost in resp.usage` (:196)."""
    body: dict[str, object] = {
        "model": "gpt-image-1",
        "prompt": PROMPT,
        "n": 1,
        "background": "auto",
        **({"response_format": "b64_json"} if compatibility_response_format else {}),
        "output_format": "png",
        "quality": "auto",
        "size": "auto",
    }
    answer = client.post(
        f"{server}/v1/images/generations", json=body, headers=LIBRECHAT_JSON_HEADERS
    )
    assert answer.status_code == 200, answer.text
    base64_image = answer.json()["data"][0].get("b64_json")
    assert base64_image, "LibreChat: No image data returned from OpenAI API"
    opened(base64.b64decode(base64_image), "image/png")
    usage = answer.json().get("usage")
    assert usage is not None, "LibreChat records no usage: the answer has none"
    assert isinstance(usage["input_tokens"], int) and usage["input_tokens"] > 0
    assert isinstance(usage["output_tokens"], int) and usage["output_tokens"] > 0


@pytest.mark.parametrize(
    "extra_fields",
    [
        {},  # OpenAIImageTools.js at 8731432f
        {"response_format": "b64_json", "output_format": "png"},  # the later version
    ],
)
def test_librechat_image_edit_oai(client, server, extra_fields):
    """The `image_edit_oai` tool, OpenAIImageTools.js at 8731432f lines 229-371: axios posts
    form-data `model`, `prompt`, `quality` `auto`, `size` `auto` (the tool's defaults; no
    `n`, no mask), then one `image[]` per referenced image id with its stored filename and
    type, and `Authorization: Bearer` (:329). It reads `response.data.data[0].b64_json`. An
    edit's `auto` size is the input's size."""
    data = {
        "model": "gpt-image-1",
        "prompt": PROMPT,
        "quality": "auto",
        "size": "auto",
        **extra_fields,
    }
    files = [("image[]", ("img-upload.png", png(), "image/png"))]
    answer = post_edit(client, server, data, files)
    assert answer.status_code == 200, answer.text
    base64_image = answer.json()["data"][0].get("b64_json")
    assert base64_image, "LibreChat: No image data returned from OpenAI API"
    assert opened(base64.b64decode(base64_image), "image/png").size == (64, 64)


# --- n8n (n8n-io/n8n) --------------------------------------------------------------------------


def test_n8n_openai_node_v1_lists_only_dall_e_names(client, server):
    """The older OpenAI node (n8n-nodes-base.openAi, versions 1 and 1.1; packages/nodes-base/
    nodes/OpenAi/ImageDescription.ts, lines 70-188 of the stored version whose commit the
    index does not expose) fills its Model list from `GET /v1/models` on the credential's
    Base URL minus its last segment, keeps the ids that start with `dall-` and sorts them by
    name; its default is `dall-e-2`."""
    answer = client.get(f"{server}/v1/models", headers=AUTH)
    answer.raise_for_status()
    names = sorted(
        model["id"] for model in answer.json()["data"] if model["id"].startswith("dall-")
    )
    assert names == ["dall-e-2", "dall-e-3"]


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_n8n_openai_node_v1_creates_an_image(client, server, response_format):
    """ImageDescription.ts (stored version) lines 1-240: `POST /v1/images/generations` with
    `prompt`, `model` and `response_format` (`b64_json` for "Binary File", the default;
    `url` for "Image Url"); `n`, `size`, `quality` and `style` only when added under Options,
    so the default body has no size (the model's default). Binary File decodes each
    `data[i].b64_json`; Image Url returns the items as they are, for a later node (an HTTP
    Request, without the key) to download."""
    body = {"prompt": PROMPT, "model": "dall-e-2", "response_format": response_format}
    answer = client.post(
        f"{server}/v1/images/generations",
        json=body,
        headers=AUTH,
    )
    assert answer.status_code == 200, answer.text
    [item] = answer.json()["data"]
    if response_format == "b64_json":
        opened(base64.b64decode(item["b64_json"]), "image/png")
    else:
        downloaded = client.get(item["url"])
        assert downloaded.status_code == 200
        opened(downloaded.content, downloaded.headers["content-type"])


@pytest.mark.parametrize(
    ("model", "options", "reads"),
    [
        ("dall-e-3", {}, "b64_json"),  # the node's defaults
        ("dall-e-2", {"n": 1, "size": "256x256"}, "b64_json"),
        ("dall-e-2", {"returnImageUrls": True}, "url"),
        ("gpt-image-1", {}, "b64_json"),  # sent no response_format (:280)
    ],
)
def test_n8n_openai_node_v2_generates(client, server, model, options, reads):
    """The OpenAI node of @n8n/nodes-langchain, packages/@n8n/nodes-langchain/nodes/vendors/
    OpenAi/v2/actions/image/generate.operation.ts at 98c7dba83628bb722e1f315de32fd899dd970096,
    lines 11-32 and 255-300: a fixed model list (dall-e-2, dall-e-3 default, gpt-image-1), body
    `prompt`, `model`, `response_format` (`url` when "Respond with Image URL(s)", else
    `b64_json`; none for gpt-image-1) and the Options the user added. It decodes each
    `entry.b64_json`, or returns the url entries without downloading them."""
    sent = dict(options)
    response_format = "url" if sent.pop("returnImageUrls", False) else "b64_json"
    body = {
        "prompt": PROMPT,
        "model": model,
        **({"response_format": response_format} if model != "gpt-image-1" else {}),
        **sent,
    }
    answer = client.post(
        f"{server}/v1/images/generations",
        json=body,
        headers=AUTH,
    )
    assert answer.status_code == 200, answer.text
    for entry in answer.json()["data"]:
        assert entry.get(reads), f"n8n reads {reads}: {sorted(entry)}"
        if reads == "b64_json":
            opened(base64.b64decode(entry["b64_json"]), "image/png")


@pytest.mark.parametrize(
    ("model", "image_field", "model_fields"),
    [
        ("gpt-image-1", "image[]", {"quality": "auto"}),
        ("dall-e-2", "image", {"response_format": "url"}),
    ],
)
def test_n8n_openai_node_v2_edits(client, server, model, image_field, model_fields):
    """edit.operation.ts at 6c161ccb7b254f3bb55c2db1975583ca745ff6c5, lines 330 on: the images
    (`image[]` per binary field for gpt-image-1, one `image` for dall-e-2), then `prompt`,
    `model`, `n` 1, `size` (default 1024x1024; 256x256 is the smallest the node offers, and
    used here), `response_format` for dall-e-2 only (default `url`), `quality` for
    gpt-image-1 only (default `auto`). `output_format` and `output_compression` are never
    sent: the code reads them from Options, where they are not (:401-406). gpt-image-1's
    answer is read as `b64_json`, dall-e-2's url entries are returned as they are."""
    data = {"prompt": PROMPT, "model": model, "n": "1", "size": "256x256", **model_fields}
    files = [(image_field, ("data.png", png(), "image/png"))]
    answer = post_edit(client, server, data, files)
    assert answer.status_code == 200, answer.text
    [entry] = answer.json()["data"]
    if model == "gpt-image-1":
        assert opened(base64.b64decode(entry["b64_json"]), "image/png").size == (256, 256)
    else:
        assert entry["url"].startswith(f"{server}/images/files/")


# --- What these apps can send that the server refuses, each a 400 naming the field ----------

SENT_AND_REFUSED = [
    pytest.param(
        "/v1/images/generations",
        {
            "model": "dall-e-3",
            "quality": "standard",
            "style": "vivid",
            "size": "1024x1024",
            "prompt": PROMPT,
            "n": 1,
        },
        [],
        "style",
        # LibreChat's DALL-E 3 tool always sends style (default vivid): api/app/clients/tools/
        # structured/DALLE3.js at 37d31ec25f2aac6a4e9a4eb3fc05e3c824250861, lines 109-125.
        id="librechat-dalle3-tool-style",
    ),
    pytest.param(
        "/v1/images/generations",
        {"prompt": PROMPT, "model": "dall-e-3", "response_format": "b64_json", "style": "vivid"},
        [],
        "style",
        id="n8n-v2-generate-style-option",  # generate.operation.ts at 98c7dba8, :195-216
    ),
    pytest.param(
        "/v1/images/generations",
        {
            "model": "gpt-image-1",
            "prompt": PROMPT,
            "n": 1,
            "background": "transparent",
            "output_format": "png",
            "quality": "auto",
            "size": "auto",
        },
        [],
        "background",
        id="librechat-image-gen-oai-transparent",  # the model may pick it (:114, :138-145)
    ),
    pytest.param(
        "/v1/images/edits",
        {
            "prompt": PROMPT,
            "model": "gpt-image-1",
            "n": "1",
            "size": "256x256",
            "input_fidelity": "low",
            "quality": "auto",
        },
        [("image[]", ("data.png", png(), "image/png"))],
        "input_fidelity",
        id="n8n-v2-edit-input-fidelity-option",  # edit.operation.ts at 6c161ccb, :398-400
    ),
    pytest.param(
        "/v1/images/edits",
        {"model": "dall-e-2", "prompt": PROMPT, "size": "64x64", "response_format": "b64_json"},
        [("image[]", (f"{n}.png", png(), "image/png")) for n in range(2)],
        "image",
        id="open-webui-chat-edit-two-images",  # images from two messages (middleware.py)
    ),
]


@pytest.mark.parametrize(("path", "fields", "files", "field"), SENT_AND_REFUSED)
def test_what_apps_send_that_the_server_refuses_is_a_400_naming_it(
    client, server, path, fields, files, field
):
    if files:
        answer = client.post(f"{server}{path}", data=fields, files=files, headers=AUTH)
    else:
        answer = client.post(f"{server}{path}", json=fields, headers=AUTH)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_open_webui_api_version_query_is_a_400_naming_it(client, server):
    """Open WebUI appends `?api-version=` when the admin fills "API Version" (an Azure
    setting; images.py:625-627); this server reads no query parameters."""
    body = open_webui_generation_body("", "64x64", dict(FAST_STEPS))
    answer = client.post(
        f"{server}/v1/images/generations?api-version=2024-02-01",
        json=body,
        headers=OPEN_WEBUI_HEADERS,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "api-version"
