"""The Images API's one state object: built once, by the launcher or by the plugin alone."""

from __future__ import annotations

from starlette.datastructures import State

from vllm_omni_images.images.app_state import ImagesState, images_state
from vllm_omni_images.server.endpoint import ImagesEndpointPlugin


async def test_the_plugin_alone_builds_the_state_once(serve_parser) -> None:
    """On a server whose engine is not an image engine (vLLM's own, with `VLLM_PLUGINS`): the
    limits only, no serving; a state already set (the launcher's) is kept."""
    args = serve_parser.parse_args(["m", "--task", "image", "--image-max-prompt-chars", "10"])
    state = State()
    state.openai_serving_models = None  # vLLM's, unread without an image engine
    assert images_state(state) is None
    plugin = ImagesEndpointPlugin()
    await plugin.init_state(None, state, args)
    images = images_state(state)
    assert isinstance(images, ImagesState)
    assert images.serving is None and images.limits.max_prompt_chars == 10
    await plugin.init_state(None, state, args)
    assert images_state(state) is images
    images.close()  # nothing to stop
