"""The OpenAI Images API, shaped like vLLM's `entrypoints/openai/<api>/` folders.

Its modules are listed in docs/architecture.md; from `engine/` it uses the engine client, the
request and output types and the exceptions, never an engine itself.
"""
