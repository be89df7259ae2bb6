"""This package's pipelines for vllm-omni, registered in its registry by its own plugin entry
point (`vllm_omni.general_plugins`, `image_task`), in every process that builds a pipeline: the
server's (`build_omni_config` loads vllm-omni's general plugins) and each worker's. Like
`platforms/`, no layer imports it; it may import `engine/` and vllm-omni."""

from __future__ import annotations

_QWEN_IMAGE = "vllm_omni_images.pipelines.qwen_image"
_FLUX = "vllm_omni_images.pipelines.flux"
_Z_IMAGE = "vllm_omni_images.pipelines.z_image"
_SD3 = "vllm_omni_images.pipelines.sd3"


def register_pipelines() -> None:
    """The `vllm_omni.general_plugins` entry `image_task`: register this package's pipelines
    with vllm-omni, each under the architecture key of the pipeline it extends (safe to call
    more than once; the modules are imported only when vllm-omni builds one)."""
    from vllm_omni.diffusion.registry import register_diffusion_model

    register_diffusion_model(
        "QwenImagePipeline",
        _QWEN_IMAGE,
        "ImageTaskQwenImagePipeline",
        pre_process_func_name="get_image_task_qwen_image_pre_process_func",
        post_process_func_name="get_qwen_image_post_process_func",
    )
    register_diffusion_model(
        "FluxPipeline",
        _FLUX,
        "ImageTaskFluxPipeline",
        pre_process_func_name="get_image_task_flux_pre_process_func",
        post_process_func_name="get_flux_post_process_func",
    )
    register_diffusion_model(
        "StableDiffusion3Pipeline",
        _SD3,
        "ImageTaskSD3Pipeline",
        pre_process_func_name="get_image_task_sd3_pre_process_func",
        post_process_func_name="get_sd3_image_post_process_func",
    )
    register_diffusion_model(
        "ZImagePipeline",
        _Z_IMAGE,
        "ZImageEditPipeline",
        post_process_func_name="get_post_process_func",
    )
