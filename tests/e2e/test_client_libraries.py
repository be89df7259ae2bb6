"""The client libraries people point at an image API, installed from PyPI (the dev group) and run
unchanged against the shared live server (conftest.py), which serves the tiny model under the
names `tiny-qwen-image`, `dall-e-2`, `dall-e-3` and `gpt-image-1`.

- LangChain: `langchain_community`'s `DallEAPIWrapper` (utilities/dalle_image_generator.py) and
  its agent tool `OpenAIDALLEImageGenerationTool`. `run()` sends `model` (`dall-e-2` by default),
  `prompt`, `n`, `size` and `quality` when set (None by default in 0.4.2), never
  `response_format`, then joins `data[i].url`. Fields it does not know go to `model_kwargs`,
  which `run()` never sends: it has no way to pass `seed` or `num_inference_steps`, so its
  images take the model's default steps. `langchain-openai` ships no images wrapper (its only
  image path is the Responses API's built-in `image_generation` tool in `ChatOpenAI`).
- LiteLLM's SDK: `litellm.image_generation`, `image_edit` and `image_variation` with
  `model="openai/<served name>"` and `api_base`. LiteLLM forwards keyword arguments it does not
  know in the OpenAI SDK's `extra_body` (utils.add_provider_specific_params_to_optional_params),
  which is how `seed` and `num_inference_steps` reach the server here.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import pytest
from pydantic import SecretStr

from tests.support.image_answers import image_tokens, png_at, png_of, token_priced_cost
from tests.support.images import FAST_STEPS, png

from .live_server import API_KEY

pytestmark = [
    pytest.mark.e2e,
    # LiteLLM's own TypedDicts, as pydantic reads them at its first call: not this server's.
    pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning"),
]

SIZE = "64x64"
LITELLM_FAST = {"size": SIZE, **FAST_STEPS, "seed": 5}
"""What a LiteLLM call adds to its prompt: a tiny image; `seed` and the steps go in `extra_body`."""


@pytest.fixture(scope="module")
def litellm() -> Iterator[ModuleType]:
    """LiteLLM, imported with its bundled cost map: at import it otherwise fetches the map from
    GitHub (`LITELLM_LOCAL_MODEL_COST_MAP`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        yield litellm


@pytest.fixture
def to_server(server: str) -> dict[str, str]:
    """The settings a LiteLLM call names this server by."""
    return {"api_base": f"{server}/v1", "api_key": API_KEY}


# LangChain


def test_langchain_dalle_tool_gets_a_url_that_opens_as_the_png_it_asked_for(server):
    from langchain_community.tools.openai_dalle_image_generation import (
        OpenAIDALLEImageGenerationTool,
    )
    from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper

    wrapper = DallEAPIWrapper(base_url=f"{server}/v1", api_key=SecretStr(API_KEY), size=SIZE)
    assert wrapper.model_name == "dall-e-2" and wrapper.quality is None  # the wrapper's defaults
    answer = OpenAIDALLEImageGenerationTool(api_wrapper=wrapper).invoke("a red lighthouse")
    assert answer.startswith(f"{server}/images/files/"), answer
    assert png_at(answer).size == (64, 64)


def test_langchain_wrapper_with_n_2_and_dall_e_quality_standard_joins_two_urls(server):
    from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper

    wrapper = DallEAPIWrapper(
        base_url=f"{server}/v1", api_key=SecretStr(API_KEY), size=SIZE, n=2, quality="standard"
    )
    urls = wrapper.run("two boats").split(wrapper.separator)
    assert len(set(urls)) == 2, urls
    assert all(png_at(url).size == (64, 64) for url in urls)


# LiteLLM's SDK: generations


def test_litellm_generation_returns_the_image_and_the_servers_usage(litellm, to_server):
    response = litellm.image_generation(
        model="openai/tiny-qwen-image", prompt="a lighthouse", **to_server, **LITELLM_FAST
    )
    [item] = response.data
    assert item.url is None and png_of(item.b64_json).size == (64, 64)  # the name's default
    usage = response.usage
    text = usage.input_tokens_details["text_tokens"]
    assert text > 0 and usage.input_tokens_details["image_tokens"] == 0
    assert usage.input_tokens == text
    assert usage.output_tokens == image_tokens(64, 64)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    # LiteLLM's chat-style names for the same counts, which its cost tracking reads.
    assert (usage.prompt_tokens, usage.completion_tokens) == (text, image_tokens(64, 64))


def test_litellm_refuses_response_format_for_a_model_it_does_not_know(litellm, to_server):
    """utils.get_optional_params_image_gen: an `openai/` model gets GPTImageGenerationConfig,
    whose supported params lack `response_format`, so LiteLLM raises before sending anything."""
    with pytest.raises(litellm.UnsupportedParamsError, match="response_format"):
        litellm.image_generation(
            model="openai/tiny-qwen-image",
            prompt="x",
            response_format="url",
            **to_server,
            **LITELLM_FAST,
        )


def test_litellm_drop_params_drops_response_format_so_the_names_default_answers(litellm, to_server):
    """`drop_params=True` drops it silently: `dall-e-2` then answers its default, a URL, though
    the caller asked for `b64_json`."""
    response = litellm.image_generation(
        model="openai/dall-e-2",
        prompt="a lighthouse",
        response_format="b64_json",
        drop_params=True,
        **to_server,
        **LITELLM_FAST,
    )
    [item] = response.data
    assert item.b64_json is None and png_at(item.url).size == (64, 64)


def test_litellm_passes_response_format_in_extra_body(litellm, to_server):
    response = litellm.image_generation(
        model="openai/tiny-qwen-image",
        prompt="a lighthouse",
        extra_body={"response_format": "url"},
        **to_server,
        **LITELLM_FAST,
    )
    [item] = response.data
    assert item.b64_json is None and png_at(item.url).size == (64, 64)


# LiteLLM's SDK: edits and variations


def test_litellm_edit_sends_multipart_and_gets_the_image_and_usage(litellm, to_server):
    """llms/openai/image_edit/transformation.py: `image[]` files, the rest form fields;
    `response_format` is among the edit's supported params, so it is sent."""
    response = litellm.image_edit(
        model="openai/tiny-qwen-image",
        image=io.BytesIO(png()),
        prompt="make it blue",
        response_format="url",
        **to_server,
        **FAST_STEPS,
    )
    [item] = response.data
    assert png_at(item.url).size == (64, 64)
    usage = response.usage
    assert usage.input_tokens_details["image_tokens"] == image_tokens(64, 64)
    assert usage.output_tokens == image_tokens(64, 64)


def test_litellm_variation_sends_only_the_image(litellm, to_server):
    """images/main.py image_variation calls the handler with `optional_params={}` and no model:
    LiteLLM drops `n`, `size`, `response_format` and `model`, so the server answers one image
    of the input's size in the default name's format (b64_json for `tiny-qwen-image`)."""
    response = litellm.image_variation(
        model="openai/tiny-qwen-image",
        image=io.BytesIO(png(width=64, height=128)),
        n=2,
        size="128x128",
        response_format="url",
        **to_server,
    )
    [item] = response.data
    assert item.url is None and png_of(item.b64_json).size == (64, 128)
    assert response.usage.input_tokens_details["image_tokens"] == image_tokens(64, 128)


# LiteLLM's cost tracking, from the server's `usage`


def priced_cost(usage: Any, prices: Mapping[str, float]) -> float:
    """`token_priced_cost` of a LiteLLM `usage` (its details are dicts)."""
    details = usage.input_tokens_details
    return token_priced_cost(
        details["text_tokens"], details["image_tokens"], usage.output_tokens, prices
    )


def priced_router(litellm: ModuleType, server: str, model: str, **prices: float) -> Any:
    """A LiteLLM `Router` with one deployment, `priced`, of `model` on this server, at the
    operator's `prices` (its `model_info`, as in a proxy's config): LiteLLM keeps them under the
    deployment's id, so the shared cost map is left as it is."""
    deployment = {
        "model_name": "priced",
        "litellm_params": {"model": model, "api_base": f"{server}/v1", "api_key": API_KEY},
        "model_info": {"mode": "image_generation", **prices},
    }
    return litellm.Router(model_list=[deployment])


def test_litellm_bills_a_gpt_image_name_from_usage_at_openais_price(litellm, to_server):
    """litellm_core_utils/llm_cost_calc/utils.py, route_image_generation_cost_calculator: an
    `openai/` name containing `gpt-image` is priced from `usage` (tokens), with LiteLLM's own
    table, which is OpenAI's price for gpt-image-1 unless the operator sets another."""
    response = litellm.image_generation(
        model="openai/gpt-image-1", prompt="a lighthouse", **to_server, **LITELLM_FAST
    )
    cost = response._hidden_params["response_cost"]
    assert cost == pytest.approx(priced_cost(response.usage, litellm.model_cost["gpt-image-1"]))
    again = litellm.completion_cost(completion_response=response, model="openai/gpt-image-1")
    assert again == pytest.approx(cost)


def test_litellm_bills_a_gpt_image_name_from_usage_at_the_operators_price(litellm, server):
    prices = {
        "input_cost_per_token": 1e-6,
        "input_cost_per_image_token": 3e-6,
        "output_cost_per_image_token": 2e-6,
    }
    router = priced_router(litellm, server, "openai/gpt-image-1", **prices)
    response = router.image_generation(model="priced", prompt="a lighthouse", **LITELLM_FAST)
    assert response._hidden_params["response_cost"] == pytest.approx(
        priced_cost(response.usage, prices)
    )


def test_litellm_bills_other_names_by_pixel_never_by_usage(litellm, server):
    """cost_calculator.py, default_image_cost_calculator: any other name is priced per image or
    per pixel of the requested size; a token price is not applied to it (no cost at all)."""
    by_token = priced_router(
        litellm,
        server,
        "openai/tiny-qwen-image",
        input_cost_per_token=1e-6,
        output_cost_per_token=2e-6,
    )
    untracked = by_token.image_generation(model="priced", prompt="a boat", **LITELLM_FAST)
    assert untracked.usage.total_tokens > 0
    assert untracked._hidden_params["response_cost"] is None
    by_pixel = priced_router(litellm, server, "openai/tiny-qwen-image", input_cost_per_pixel=1e-8)
    short, long = (
        by_pixel.image_generation(model="priced", prompt=prompt, **LITELLM_FAST)
        for prompt in ("a boat", "a long, detailed painting of a harbour at dusk, in oils")
    )
    assert short.usage.input_tokens < long.usage.input_tokens
    for response in (short, long):
        assert response._hidden_params["response_cost"] == pytest.approx(64 * 64 * 1e-8)
