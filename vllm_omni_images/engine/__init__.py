"""The engines and admission: everything below the HTTP API, importable without vLLM
(docs/architecture.md maps its modules). This file re-exports nothing, so reading a flag's
choices (`names.py`) does not pull in PIL, torch or the engines."""
