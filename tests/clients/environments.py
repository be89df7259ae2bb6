"""What the client tests know of their environments and their server (conftest.py starts it)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENTS_ENV = REPO / ".venv-clients"
"""testing/clients: llama-index-tools-text-to-image and litellm[proxy], as their lock gives."""
OPENAI0_ENV = REPO / ".venv-clients-openai0"
"""testing/clients/openai0: the text-to-image tool on openai 0.28.1, the SDK its code calls."""

API_KEY = "clients-secret"
SERVED_NAMES = ("dall-e-2", "tiny-qwen-image", "gpt-image-1")
"""`dall-e-2` first: the name a request without `model` is served under (OpenAI's default
images model), so it answers `url` by default; `tiny-qwen-image` answers `b64_json`; a
`gpt-image` name is what LiteLLM prices from `usage`."""

OFFLINE = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "HF_HUB_OFFLINE": "1",
    # LiteLLM fetches its model cost map from GitHub at import unless told to use its own copy.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}
"""What every client process's environment adds to this one's."""


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment with `OFFLINE` and `extra` laid over it."""
    return {**os.environ, **OFFLINE, **extra}
