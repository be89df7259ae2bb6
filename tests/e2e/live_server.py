"""What the end-to-end tests know of the shared live server (`conftest.py` starts it)."""

API_KEY = "e2e-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SERVED_NAMES = ("tiny-qwen-image", "dall-e-2", "dall-e-3", "gpt-image-1")
"""`--served-model-name`: the model's own name first, then the apps' default model names."""
ADAPTERS = ("style", "character")
"""`--lora-modules`: two tiny random adapters (seeds 1 and 3 of `tiny_loras`), so that a
request's `lora` can stack both (`--max-loras 2`); /v1/models lists them in this order."""
