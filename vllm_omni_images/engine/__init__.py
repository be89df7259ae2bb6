"""The engines and admission: everything below the HTTP API, importable without vLLM.

- `base.py`: `ImageEngine`, the one engine interface (as vLLM's `EngineClient`), what it
  takes (`EngineRequest`, `LoRAAdapter`) and streams (`ImagesStarted`, `PreviewImages`,
  `FinalImages`), `ModelDefaults`, `LoRASettings`, and the `EngineObserver` the metrics
  implement.
- `errors.py`: every exception this layer raises, the ones a client can see first.
- `client.py`: `ImageEngineClient`, admission in front of any engine (queue limit, 429,
  timeout, withdrawal, the counts) and vLLM's engine client.
- `batching.py`: `BatchingEngine`, which batches for a pipeline runner (batcher,
  out-of-memory halving, hang watch); `batch_planning.py`, its pure planning functions.
- `diffusers_runner.py`: any diffusers pipeline, on CPU or GPU, the runner `BatchingEngine`
  drives; `previews.py`, its partial images.
- `omni_engine.py`: vllm-omni's `DiffusionEngine`, which batches by itself.
- `hang_watch.py`: telling a hung engine from a slow one, for both engines.
- `selection.py`: `choose_engine` and `create_engine`; `names.py`, the `--image-engine` names.
- `metrics.py`: Prometheus metrics of admission and the engines.
- `model_folder.py`: what a model folder says; `model_source.py`: a hub id to a folder
  (`--revision`, `--download-dir`); `lora_files.py`: LoRA adapter files, read and checked;
  `cpu_priority.py`: bulk work steps aside.

Modules import what they need from each other directly; this file re-exports nothing, so
reading a flag's choices (`names.py`) does not pull in PIL, torch or the engines.
"""
