"""Z-Image for vllm-omni with its edits: vllm-omni's `ZImagePipeline` already runs image-to-image
from `multi_modal_data["image"]` at a `strength`, but declares no image input (so no edit
reaches it); `ZImageEditPipeline` declares both and builds its transformer from the folder's
config. Registered in place of vllm-omni's under Z-Image's key (`register_pipelines`)."""

from __future__ import annotations

import os
from typing import ClassVar

from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from vllm_omni.diffusion.data import OmniDiffusionConfig
from vllm_omni.diffusion.distributed.autoencoders.autoencoder_kl import DistributedAutoencoderKL
from vllm_omni.diffusion.distributed.utils import get_local_device
from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader
from vllm_omni.diffusion.model_loader.hub_prefetch import prefetch_subfolders
from vllm_omni.diffusion.models.utils import create_transformers_model
from vllm_omni.diffusion.models.z_image.pipeline_z_image import (
    ZImagePipeline,
    get_post_process_func,
)
from vllm_omni.diffusion.models.z_image.z_image_transformer import ZImageTransformer2DModel
from vllm_omni.diffusion.utils.tf_utils import get_transformer_config_kwargs

__all__ = [
    "ZImageEditPipeline",
    "get_post_process_func",  # vllm-omni's, looked up in this module once registered
]


class ZImageEditPipeline(ZImagePipeline):
    """vllm-omni's Z-Image: text-to-image, and image-to-image from an input image at a
    `strength` (its own `forward`, unchanged)."""

    support_image_input: ClassVar[bool] = True
    support_strength: ClassVar[bool] = True  # engine.omni_requests.STRENGTH_FLAG

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = "") -> None:
        """vllm-omni's `ZImagePipeline.__init__`, but with the transformer of the folder's
        `transformer/config.json`, as its Qwen-Image pipelines build theirs (vllm-omni's Z-Image
        builds the released 6B size whatever the folder says). Like vllm-omni's own Z-Image
        subclasses, it builds its components itself rather than through the parent's."""
        nn.Module.__init__(self)
        self.od_config = od_config
        self.weights_sources = [
            DiffusersPipelineLoader.ComponentSource(
                model_or_path=od_config.model,
                subfolder=subfolder,
                revision=od_config.revision,
                prefix=f"{subfolder}.",
            )
            for subfolder in ("text_encoder", "transformer", "vae")
        ]
        self._execution_device = get_local_device()
        model = od_config.model
        local_files_only = os.path.exists(model)
        prefetch_subfolders(
            model,
            ["scheduler", "text_encoder", "vae", "tokenizer"],
            local_files_only=local_files_only,
        )
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            model, subfolder="scheduler", local_files_only=local_files_only
        )
        text_encoder_config = AutoConfig.from_pretrained(
            model, subfolder="text_encoder", local_files_only=local_files_only
        )
        self.text_encoder = create_transformers_model(
            AutoModelForCausalLM, od_config, hf_config=text_encoder_config
        ).to(self._execution_device)
        if text_encoder_config.tie_word_embeddings:
            self.text_encoder.lm_head.weight = self.text_encoder.get_input_embeddings().weight
        vae_config = DistributedAutoencoderKL.load_config(
            model, subfolder="vae", local_files_only=local_files_only
        )
        self.vae = DistributedAutoencoderKL.from_config(vae_config).to(self._execution_device)
        self.transformer = ZImageTransformer2DModel(
            quant_config=od_config.quantization_config,
            **get_transformer_config_kwargs(od_config.tf_model_config, ZImageTransformer2DModel),
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            model, subfolder="tokenizer", local_files_only=local_files_only
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.setup_diffusion_pipeline_profiler(
            enable_diffusion_pipeline_profiler=od_config.enable_diffusion_pipeline_profiler
        )
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor * 2, do_convert_rgb=True
        )
