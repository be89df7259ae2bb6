"""The engines and their scheduler: everything below the HTTP API, importable without vLLM.

- `base.py`: the `ImageEngine` interface, `EngineRequest` and `ModelDefaults`.
- `errors.py`: every exception this layer raises, the ones a client can see first.
- `selection.py`: `--image-engine` names and `create_engine`.
- `diffusers_engine.py`: any diffusers pipeline, on CPU or GPU.
- `scheduler.py`: the queue and batcher in front of one engine.
- `client.py`: `ImageEngineClient`, the one object the API layer and vLLM's server talk to.
- `metrics.py`: Prometheus metrics of the scheduler and the requests.
- `cpu_priority.py`: bulk work steps aside for the event loop.

Modules import what they need from each other directly; this file re-exports nothing, so
reading a flag's choices does not pull in PIL, torch or the scheduler.
"""
