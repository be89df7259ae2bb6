"""The OpenAI Images API, shaped like vLLM's `entrypoints/openai/<api>/` folders.

- `api_router.py`: the routes, thin: parse, call serving, serialise.
- `protocol.py`: request and response models; a request maps itself to engine work.
- `serving.py`: `OpenAIServingImage`, which returns a response or vLLM's `ErrorResponse`.
- `errors.py`: the one table from exceptions to HTTP status, error type and metrics outcome.
- `limits.py`: what a request may send and ask for (the `--image-max-*` flags), checked first.
- `encoding.py`: images to PNG, JPEG or WebP bytes.

New endpoints (edits, variations, streaming, the file store) go here. This layer talks to the
engine layer only through `engine.client.ImageEngineClient` and the engine's request types.
"""
