"""What the end-to-end tests know of the shared live server (`conftest.py` starts it)."""

API_KEY = "e2e-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SERVED_NAMES = ("tiny-qwen-image", "dall-e-2", "dall-e-3", "gpt-image-1")
"""`--served-model-name`: the model's own name first, then the apps' default model names."""
