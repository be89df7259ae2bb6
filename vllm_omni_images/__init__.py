"""The OpenAI Images API for diffusion models, as a vLLM plugin."""
