"""This package's pipelines for vllm-omni, registered in its registry by its own plugin entry
point (`vllm_omni.general_plugins`, `image_task`), in every process that builds a pipeline: the
server's (`build_omni_config` loads vllm-omni's general plugins) and each worker's. Like
`platforms/`, no layer imports it; it may import `engine/` and vllm-omni."""

from __future__ import annotations


def register_pipelines() -> None:
    """The `vllm_omni.general_plugins` entry `image_task`: register this package's pipelines
    with vllm-omni (safe to call more than once)."""
