"""The choices of the nodes' `model` and `lora_name` pickers: the models and LoRA adapters
the package's default server serves.

ComfyUI builds a node's widgets from its `INPUT_TYPES()`, which the browser fetches through
`/object_info` when the page loads and when the user refreshes the node definitions (the "R"
key); ComfyUI also calls it while it validates and runs each queued prompt. It gets no widget
values, so the list comes from the default server (`$COMFYUI_VLLM_IMAGES_URL`, else
`http://127.0.0.1:8000`) with the key from ComfyUI's environment, not from a node's own
`server_url`/`api_key`; the nodes accept any name, listed or not (`accepts_model`,
`accepts_adapter`).

ComfyUI serves `/object_info` on its event loop and drops a node whose `INPUT_TYPES()`
raises, so the lookup has a short timeout, never raises, and is cached for a few seconds:
one page load or one queued prompt asks the server once, not once per node and per step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .client import (
    SERVER_URL_ENV_VAR,
    ImagesClient,
    ServedModel,
    ServerError,
    default_server_url,
    resolve_api_key,
)

SERVER_DEFAULT_MODEL = "(server default)"
"""The first choice: sends no `model`, so the server uses its base model, whatever its name
(a workflow saved with it runs against any server)."""
LIST_TIMEOUT_S = 2.0
"""Seconds to wait for `/v1/models`: ComfyUI's page waits that long for a server that does not
answer (one that is not running is refused at once)."""
CACHE_TTL_S = 5.0
NO_ADAPTER = "(no adapter listed)"
"""The adapter picker's only choice while the default server lists no LoRA adapter (it is not
running, serves none, or the key is wrong): refused when queued, saying what to do."""

logger = logging.getLogger(__name__)

Fetch = Callable[[str, str], list[ServedModel]]


def fetch_models(base_url: str, api_key: str) -> list[ServedModel]:
    return ImagesClient(base_url, api_key, timeout_s=LIST_TIMEOUT_S).models()


class ModelList:
    """`/v1/models` of the default server, cached for `ttl_s` (failures too, so that an
    unreachable server costs one timeout per period, not one per call)."""

    def __init__(
        self,
        fetch: Fetch = fetch_models,
        ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch, self._ttl_s, self._clock = fetch, ttl_s, clock
        self._lock = threading.Lock()  # the event loop's /object_info and the prompt worker
        self._cached: tuple[float, tuple[str, str], list[ServedModel]] | None = None
        self._last_failure = ""

    def models(self) -> list[ServedModel]:
        """The served models; empty when the server cannot be listed."""
        source = (default_server_url(), resolve_api_key(None))
        with self._lock:
            now = self._clock()
            if self._cached is not None:
                at, cached_source, models = self._cached
                if cached_source == source and now - at < self._ttl_s:
                    return models
            models = self._lookup(*source)
            self._cached = (now, source, models)
            return models

    def _lookup(self, base_url: str, api_key: str) -> list[ServedModel]:
        try:
            models = self._fetch(base_url, api_key)
        except (ServerError, ValueError) as error:  # ValueError: an empty URL
            self._log_failure(base_url, str(error))
            return []
        self._last_failure = ""
        return models

    def _log_failure(self, base_url: str, reason: str) -> None:
        # Once per distinct failure: the page and every queued prompt ask again.
        if reason == self._last_failure:
            return
        self._last_failure = reason
        logger.warning(
            "vLLM Images: cannot list the models of %s (%s); the nodes' model list offers "
            "only %r until it answers and the node definitions are refreshed (R).",
            base_url,
            reason,
            SERVER_DEFAULT_MODEL,
        )

    def choices(self) -> list[str]:
        """The combo's entries: `SERVER_DEFAULT_MODEL`, then each served name once."""
        names = [SERVER_DEFAULT_MODEL]
        for model in self.models():
            if model.name not in names:
                names.append(model.name)
        return names

    def adapters(self) -> list[str]:
        """The adapter combo's entries: each LoRA adapter (a card with a `parent`, the base
        model it adapts) once, in the server's order; `NO_ADAPTER` alone when there is none."""
        names = [model.name for model in self.models() if model.parent is not None]
        return list(dict.fromkeys(names)) or [NO_ADAPTER]


MODELS = ModelList()
"""The default server's list, which every node's pickers share."""


def accepts_model(model: object) -> bool | str:
    """ComfyUI's `VALIDATE_INPUTS` answer for `model`: True for any name.

    ComfyUI refuses a combo value that its list lacks ("Value not in list") unless the node's
    `VALIDATE_INPUTS` names that input, and the list cannot be the judge here: it is the
    default server's as of the last refresh, while a node may use another `server_url`, and a
    saved workflow may name an adapter that is not loaded now. The server judges the name when
    the node runs (an unknown one: its 404 message, on the node). None: the input is linked
    (ComfyUI validates before the linked node has run).
    """
    if model is None or isinstance(model, str):
        return True
    return f"model must be a served model's name, not {model!r}"


def adapter_problem(lora_name: object) -> str | None:
    """Why `lora_name` names no adapter to send (None: it does). Any other name is sent, and
    the server judges it (an adapter it does not serve: its 404 message, on the node)."""
    if not isinstance(lora_name, str):
        return f"lora_name must be a LoRA adapter's name, not {lora_name!r}"
    if lora_name.strip() in ("", NO_ADAPTER):
        return (
            f"No LoRA adapter chosen: the server at ${SERVER_URL_ENV_VAR} (else "
            "http://127.0.0.1:8000) listed none when the node definitions were read. Serve one "
            "(vllm serve ... --enable-lora --lora-modules name=path), then refresh them (R) "
            "and pick it."
        )
    return None


def accepts_adapter(lora_name: object) -> bool | str:
    """ComfyUI's `VALIDATE_INPUTS` answer for `lora_name`, as `accepts_model` for `model`: any
    name (the list may be another server's, or older than the workflow) but the placeholder.
    None: the input is linked, judged when the node runs."""
    return True if lora_name is None else (adapter_problem(lora_name) or True)
