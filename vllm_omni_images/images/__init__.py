"""The OpenAI Images API, shaped like vLLM's `entrypoints/openai/<api>/` folders.

- `api_router.py`: the routes, thin: parse, call serving, serialise.
- `protocol.py`: request and response models; their validators refuse what no request may
  ask. `request_mapping.py`: a request as engine work (`to_engine_request`).
- `serving.py`: `OpenAIServingImage`, which returns a response (or a stream of events) or
  vLLM's `ErrorResponse`.
- `edits.py`: the multipart bodies of edits and variations; `streaming.py`: the events of
  `stream: true`; `encoding.py`: PNG, JPEG or WebP; `file_store.py`: `url` responses.
- `errors.py`: the one table from exceptions to HTTP status, error type and metrics outcome;
  `safe_text.py`: what a client sent, cut short and escaped for logs and messages.
- `app_state.py`: `ImagesState`, all the routes read from the app state.
- `limits.py`: what a request may send and ask for (the `--image-max-*` flags);
  `request_guard.py`: the checks before a body is read (query, body size, duplicate keys).
- `request_metrics.py`: each answered request's outcome (`Outcome`), images and encoding time.

From the engine layer this layer uses the engine client (`engine.client.ImageEngineClient`:
admission and the engine's stream), the request and output types of `engine.base`, and the
exceptions of `engine.errors`, which the error table maps; never an engine itself.
"""
