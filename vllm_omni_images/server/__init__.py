"""`vllm serve <model> --task image`: everything that plugs this package into vLLM.

- `plugin.py`: the `vllm.general_plugins` entry point (runs in every vLLM process).
- `cli_args.py`: `ImageTaskArgs`, `--task` and the `--image-*` flags; how to spot them on a
  command line.
- `vllm_patches.py`: every change this package makes to vLLM's objects, in one module.
- `endpoint.py`: the `vllm.endpoint_plugins` entry point `images` (attaches the Images API).
- `launcher.py`: vLLM's own `build_app` + `serve_http` around an image engine.
- `model_registry.py`: what `/v1/models` lists for an image model.

A new flag is a field of `ImageTaskArgs`; its methods hand it to the config it sets.
"""
