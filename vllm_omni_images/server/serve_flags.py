"""What `vllm serve --task image` does with each of vLLM's serve flags: no flag is silently ignored.

Every flag of vLLM's `vllm serve` parser is either

- HONOURED: it means something for an image server, and the server does it (vLLM's own app
  and HTTP server handle the Frontend flags for us, the launcher hands the model flags to the
  engines), or
- REFUSED: the image task cannot honour it (a text-model setting: tokenizer, KV cache,
  speculative decoding, ...); given with a value other than its default, the server does not
  start, and says so in one line naming every such flag (`refused_flags`, `refusal_message`).

`SERVE_FLAGS` is keyed by argparse `dest`, in the order of vLLM's parser, grouped by its
argument groups; this plugin's own ImageTask group (`cli_args.py`) is always honoured.
`tests/unit/test_serve_flags.py` fails when vLLM adds a flag this table does not classify, and
when docs/image_api.md's table ("vLLM's serve flags") differs from `markdown_table()`:
`python -m vllm_omni_images.server.serve_flags --markdown` prints it.

Imported by the launcher: no vLLM import here, only the standard library and `cli_args`.
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from vllm_omni_images.server.cli_args import HELP_GROUP, add_image_cli_args


class Verdict(enum.Enum):
    HONOURED = "honoured"
    REFUSED = "refused"


@dataclass(frozen=True)
class FlagRule:
    verdict: Verdict
    how: str
    """One line: what the flag does for images, or why it is refused and what to use instead."""
    also_accepts: tuple[object, ...] = ()
    """Values of a refused flag that ask for nothing beyond its default (`--api-server-count 1`)."""


def _honoured(how: str) -> FlagRule:
    return FlagRule(Verdict.HONOURED, how)


def _refused(how: str, also_accepts: tuple[object, ...] = ()) -> FlagRule:
    return FlagRule(Verdict.REFUSED, how, also_accepts)


# Reasons shared by several flags.
_CHAT = "chat completions only: the Images API has no chat template or roles"
_TOOLS = "tool calling of chat models: the Images API has no tools"
_TOKENS = "about a text model's tokens: a diffusion model's answers are images"
_TOKENIZER = "a text model's tokenizer: a diffusion pipeline loads its own, from its folder"
_LOGITS = "token sampling of a text model: the image engines sample no tokens"
_KV_CACHE = "vLLM's KV cache of a text model: the image engines keep none"
_MAMBA = "Mamba (state-space) text models only"
_DATA_PARALLEL = (
    "vLLM's data parallelism of a text engine: run one image server per GPU set behind a "
    "load balancer"
)
_CONTEXT_PARALLEL = "context parallelism of a text model's attention over tokens"
_EXPERT_PARALLEL = "expert parallelism of vLLM's MoE text models"
_MULTI_NODE = "a vLLM engine across nodes: the image engines run on one node"
_MULTIMODAL = (
    "multimodal inputs of a text model: edit images are read by the Images API "
    "(--image-max-input-*)"
)
_SPECULATIVE = "speculative decoding of tokens: denoising has nothing to speculate"
_SCHEDULER = (
    "vLLM's token scheduler: images are scheduled by --image-max-batch-size, "
    "--image-batch-delay-ms and --image-max-queue"
)
_COMPILATION = (
    "vLLM's torch.compile and CUDA graphs of a text model: --enforce-eager turns vllm-omni's "
    "compilation off"
)
_KERNELS = "vLLM's kernels for text models: the image engines choose their own"
_ENGINE_CORE = "vLLM's text engine core, which the image task does not start"
_CPU_OFFLOAD = (
    "vLLM's weight offload of a text model: use --enable-cpu-offload or "
    "--enable-layerwise-offload (vllm-omni engine)"
)
_TRACING = (
    "vLLM's engine tracing and metrics: the image server's metrics are vllm:image_* on /metrics"
)
_LORA_TEXT = "LoRA of vLLM's text layers: diffusion adapters are loaded by the image engines"
_LOAD = "vLLM's weight loader: the image engines load through diffusers or vllm-omni"
_CORS = "CORS, by vLLM's middleware on the image routes too"
_TLS = "TLS of the HTTP server (vLLM's serve_http)"
_DP_SUPERVISOR = "vLLM's data-parallel supervisor: an image server has one engine"

_VLLM_GROUPS: dict[str, dict[str, FlagRule]] = {
    "positional arguments": {
        "model_tag": _honoured(
            "the model: a diffusers pipeline folder, a hub id, or tiny-qwen-image"
        ),
    },
    "options": {
        "headless": _refused(
            "runs vLLM engines without an API server: an image server is its API and its engine"
        ),
        "api_server_count": _refused(
            "one API process serves the image engine; more would each load the model",
            also_accepts=(1,),
        ),
        "config": _honoured(
            "a YAML file of flags, read by vLLM's parser: each is judged here as if given"
        ),
        "grpc": _refused("vLLM's gRPC server speaks text generation: the Images API is HTTP"),
        "disable_log_stats": _honoured(
            "stops vLLM's periodic stats call (the image metrics stay on /metrics)"
        ),
        "aggregate_engine_logging": _refused(
            "aggregates the stats logs of vLLM's data-parallel text engines"
        ),
        "fail_on_environ_validation": _refused(
            "vLLM checks VLLM_* variables when it builds a text engine config, which the image "
            "task does not"
        ),
        "shutdown_timeout": _honoured(
            "on SIGTERM/SIGINT, seconds accepted requests may finish before the engine closes"
        ),
        "gdn_prefill_backend": _refused("kernels of a text model's GDN layers"),
        "kda_prefill_backend": _refused("kernels of a text model's KDA layers"),
        "kda_decode_backend": _refused("kernels of a text model's KDA layers"),
        "enable_log_requests": _honoured(
            "each image request is logged in one line (id, size, n, steps, timings), with or "
            "without it; prompts never are"
        ),
    },
    "Frontend": {
        "lora_modules": _honoured(
            "LoRA adapters loaded at start-up, each served under its name (/v1/models, `model`)"
        ),
        "chat_template": _refused(_CHAT),
        "chat_template_content_format": _refused(_CHAT),
        "trust_request_chat_template": _refused(_CHAT),
        "default_chat_template_kwargs": _refused(_CHAT),
        "response_role": _refused(_CHAT),
        "return_tokens_as_token_ids": _refused(_TOKENS),
        "enable_auto_tool_choice": _refused(_TOOLS),
        "exclude_tools_when_tool_choice_none": _refused(_TOOLS),
        "tool_call_parser": _refused(_TOOLS),
        "tool_parser_plugin": _refused(_TOOLS),
        "tool_server": _refused(_TOOLS),
        "log_config_file": _honoured("uvicorn's logging config (JSON) for the HTTP server"),
        "max_log_len": _refused(
            "shortens the prompts in vLLM's request log: the image request log holds no prompt"
        ),
        "enable_prompt_tokens_details": _refused(_TOKENS),
        "enable_per_request_metrics": _refused(
            "per-request token metrics of text answers: image timings are in the request log line "
            "and on /metrics"
        ),
        "enable_server_load_tracking": _honoured("/load counts the image requests in flight"),
        "enable_force_include_usage": _refused(_TOKENS),
        "sse_keep_alive_interval": _honoured(
            "seconds without an event after which a streamed image request gets vLLM's "
            "keep-alive comment"
        ),
        "enable_tokenizer_info_endpoint": _refused(_TOKENIZER),
        "enable_log_outputs": _refused("logs generated text: an image server generates none"),
        "enable_log_deltas": _refused("logs streamed text deltas: an image server streams none"),
        "cohere_is_reasoning_model": _refused("the Cohere chat API of text models"),
        "cohere_format": _refused("the Cohere chat API of text models"),
        "log_error_stack": _honoured("a failed image request's log line carries its traceback"),
        "tokens_only": _refused(_TOKENS),
        "enable_scale_out": _refused("vLLM's scale-out routes of text generation"),
        "fingerprint_mode": _refused("system_fingerprint of text answers"),
        "fingerprint_value": _refused("system_fingerprint of text answers"),
        "host": _honoured("the address the server listens on"),
        "port": _honoured("the port the server listens on"),
        "data_parallel_supervisor_port": _refused(_DP_SUPERVISOR),
        "dp_supervisor_probe_interval_s": _refused(_DP_SUPERVISOR),
        "dp_supervisor_probe_timeout_s": _refused(_DP_SUPERVISOR),
        "dp_supervisor_probe_failure_threshold": _refused(_DP_SUPERVISOR),
        "uds": _honoured("listen on this Unix socket instead of --host/--port"),
        "uvicorn_log_level": _honoured("uvicorn's log level"),
        "disable_uvicorn_access_log": _honoured("no access log lines"),
        "disable_access_log_for_endpoints": _honoured(
            "no access log lines for these paths (comma-separated, e.g. /health,/metrics)"
        ),
        "allow_credentials": _honoured(_CORS),
        "allowed_origins": _honoured(_CORS),
        "allowed_methods": _honoured(_CORS),
        "allowed_headers": _honoured(_CORS),
        "api_key": _honoured(
            "/v1/* needs `Authorization: Bearer <key>` (image URLs, outside /v1, are their own key)"
        ),
        "ssl_keyfile": _honoured(_TLS),
        "ssl_certfile": _honoured(_TLS),
        "ssl_ca_certs": _honoured(_TLS),
        "enable_ssl_refresh": _honoured("reloads the TLS files when they change"),
        "ssl_cert_reqs": _honoured(_TLS),
        "ssl_ciphers": _honoured(_TLS),
        "root_path": _honoured("FastAPI's root path, behind a path-based proxy"),
        "middleware": _honoured("ASGI middleware (a class or an http function) added to the app"),
        "enable_request_id_headers": _honoured("answers carry an X-Request-Id header"),
        "disable_fastapi_docs": _honoured("no /docs, /redoc or /openapi.json"),
        "h11_max_incomplete_event_size": _honoured("the HTTP server's limit on a request's head"),
        "h11_max_header_count": _honoured("the HTTP server's limit on a request's header count"),
        "enable_offline_docs": _honoured("/docs from vendored assets, for air-gapped machines"),
        "enable_flash_late_interaction": _refused("late-interaction scoring of pooling models"),
    },
    "ModelConfig": {
        "model": _honoured("the model: a diffusers pipeline folder, a hub id, or tiny-qwen-image"),
        "runner": _refused("vLLM's text runners: --task image chooses the image engines"),
        "convert": _refused("converts a text model for pooling: a diffusion model is not one"),
        "tokenizer": _refused(_TOKENIZER),
        "tokenizer_mode": _refused(_TOKENIZER),
        "trust_remote_code": _honoured(
            "a pipeline's own code (custom pipelines) may run, in both engines"
        ),
        "dtype": _honoured(
            "both engines' weight dtype; auto: float32 on the CPU, bfloat16 on a GPU"
        ),
        "seed": _honoured("seeds the server's draw of random seeds for requests without a seed"),
        "hf_config_path": _refused("a text model's config.json: a pipeline has model_index.json"),
        "allowed_local_media_path": _refused(
            "edit images are never read from server paths: send a file, a data: URL, or an "
            "http(s) URL from --allowed-media-domains"
        ),
        "allowed_media_domains": _honoured(
            "edits and variations fetch http(s) image URLs from these hosts only (none: never)"
        ),
        "revision": _honoured("the model's revision on the hub, for both engines"),
        "code_revision": _refused(
            "the revision of a text model's remote code: the image engines load code at --revision"
        ),
        "tokenizer_revision": _refused(_TOKENIZER),
        "max_model_len": _refused(
            "the context length of a text model: image sizes are limited by --image-max-pixels"
        ),
        "quantization": _refused(
            "vLLM's quantization of a text model: use --diffusion-quantization-config "
            "(vllm-omni engine)"
        ),
        "quantization_config": _refused(
            "vLLM's quantization of a text model: use --diffusion-quantization-config "
            "(vllm-omni engine)"
        ),
        "allow_deprecated_quantization": _refused(
            "vLLM's quantization of a text model: use --diffusion-quantization-config "
            "(vllm-omni engine)"
        ),
        "enforce_eager": _honoured(
            "vllm-omni engine: no torch.compile (the diffusers engine never compiles)"
        ),
        "enable_return_routed_experts": _refused(_EXPERT_PARALLEL),
        "return_sampling_mask": _refused(_LOGITS),
        "max_logprobs": _refused(_LOGITS),
        "logprobs_mode": _refused(_LOGITS),
        "use_fp64_gumbel": _refused(_LOGITS),
        "enable_trace_replay": _refused(_LOGITS),
        "disable_sliding_window": _refused("sliding-window attention over a text model's tokens"),
        "disable_cascade_attn": _refused("cascade attention over a text model's shared prefixes"),
        "skip_tokenizer_init": _refused(_TOKENIZER),
        "enable_prompt_embeds": _refused("prompt embeddings of a text model: send a prompt"),
        "served_model_name": _honoured(
            "the names /v1/models lists and a request's `model` may use"
        ),
        "config_format": _refused("a text model's config format: a pipeline has model_index.json"),
        "hf_token": _honoured("the hub token for gated or private models, for both engines"),
        "hf_overrides": _refused("overrides a text model's config.json"),
        "model_class_overrides": _refused(
            "vLLM's text model classes: use --model-class-name (vllm-omni engine)"
        ),
        "pooler_config": _refused("pooling models only"),
        "generation_config": _refused(
            "a text model's generation_config.json: request defaults come from the pipeline "
            "(its folder's vllm_omni_images.json)"
        ),
        "override_generation_config": _refused(
            "a text model's generation_config.json: request defaults come from the pipeline "
            "(its folder's vllm_omni_images.json)"
        ),
        "enable_sleep_mode": _refused(
            "vLLM's sleep and wake-up of a text engine: the image engines do not sleep"
        ),
        "enable_cumem_allocator": _refused("the memory pool of vLLM's text engine (sleep mode)"),
        "enable_nccl_comm_suspend": _refused("suspends NCCL in vLLM's sleep mode"),
        "model_impl": _refused("vLLM's or transformers' text model classes"),
        "logits_processors": _refused(_LOGITS),
        "io_processor_plugin": _refused("vLLM's input/output processors of pooling models"),
        "renderer_num_workers": _refused("workers of vLLM's prompt renderer (chat templates)"),
    },
    "LoadConfig": {
        "load_format": _refused(
            "vLLM's weight loader of a text model: use --diffusion-load-format (vllm-omni engine)"
        ),
        "download_dir": _honoured("where hub models are downloaded to, for both engines"),
        "safetensors_load_strategy": _refused(_LOAD),
        "safetensors_prefetch_num_threads": _refused(_LOAD),
        "safetensors_prefetch_block_size": _refused(_LOAD),
        "model_loader_extra_config": _refused(_LOAD),
        "ignore_patterns": _refused(_LOAD),
        "use_tqdm_on_load": _refused(_LOAD),
        "pt_load_map_location": _refused(_LOAD),
    },
    "AttentionConfig": {
        "attention_backend": _refused(
            "vLLM's attention of a text model: use --diffusion-attention-backend (vllm-omni engine)"
        ),
    },
    "MambaConfig": {
        "mamba_backend": _refused(_MAMBA),
        "mamba_ssu_algorithm": _refused(_MAMBA),
        "enable_mamba_cache_stochastic_rounding": _refused(_MAMBA),
        "mamba_cache_philox_rounds": _refused(_MAMBA),
    },
    "StructuredOutputsConfig": {
        "reasoning_parser": _refused("reasoning of chat models: the Images API has none"),
        "reasoning_parser_plugin": _refused("reasoning of chat models: the Images API has none"),
    },
    "ParallelConfig": {
        "distributed_executor_backend": _honoured(
            "vllm-omni engine: mp, uni, or a DiffusionExecutor class's path"
        ),
        "pipeline_parallel_size": _refused(
            "vLLM's pipeline parallelism of a text model: use --tensor-parallel-size, "
            "--ulysses-degree, --ring or --cfg-parallel-size (vllm-omni engine)",
            also_accepts=(1,),
        ),
        "master_addr": _refused(_MULTI_NODE),
        "master_port": _refused(_MULTI_NODE),
        "nnodes": _refused(_MULTI_NODE),
        "node_rank": _refused(_MULTI_NODE),
        "distributed_timeout_seconds": _refused(f"{_ENGINE_CORE} (its process groups)"),
        "cpu_distributed_timeout_seconds": _refused(f"{_ENGINE_CORE} (its process groups)"),
        "numa_bind": _refused(f"{_ENGINE_CORE} (its workers' NUMA binding)"),
        "numa_bind_nodes": _refused(f"{_ENGINE_CORE} (its workers' NUMA binding)"),
        "numa_bind_cpus": _refused(f"{_ENGINE_CORE} (its workers' NUMA binding)"),
        "device_ids": _refused(
            f"{_ENGINE_CORE} (its workers' devices): choose GPUs with CUDA_VISIBLE_DEVICES"
        ),
        "tensor_parallel_size": _honoured(
            "vllm-omni engine: tensor parallelism of the DiT (the diffusers engine refuses > 1)"
        ),
        "decode_context_parallel_size": _refused(_CONTEXT_PARALLEL),
        "dcp_comm_backend": _refused(_CONTEXT_PARALLEL),
        "dcp_q_replicate": _refused(_CONTEXT_PARALLEL),
        "dcp_kv_cache_interleave_size": _refused(_CONTEXT_PARALLEL),
        "cp_kv_cache_interleave_size": _refused(_CONTEXT_PARALLEL),
        "prefill_context_parallel_size": _refused(_CONTEXT_PARALLEL),
        "data_parallel_size": _refused(_DATA_PARALLEL, also_accepts=(1,)),
        "data_parallel_rank": _refused(_DATA_PARALLEL),
        "data_parallel_start_rank": _refused(_DATA_PARALLEL),
        "data_parallel_size_local": _refused(_DATA_PARALLEL),
        "data_parallel_address": _refused(_DATA_PARALLEL),
        "data_parallel_rpc_port": _refused(_DATA_PARALLEL),
        "data_parallel_backend": _refused(_DATA_PARALLEL),
        "data_parallel_hybrid_lb": _refused(_DATA_PARALLEL),
        "data_parallel_external_lb": _refused(_DATA_PARALLEL),
        "data_parallel_multi_port_external_lb": _refused(_DATA_PARALLEL),
        "enable_expert_parallel": _refused(_EXPERT_PARALLEL),
        "enable_batch_sharded_sampling": _refused(_LOGITS),
        "enable_ep_weight_filter": _refused(_EXPERT_PARALLEL),
        "all2all_backend": _refused(_EXPERT_PARALLEL),
        "enable_dbo": _refused("dual-batch overlap of a text model's micro-batches"),
        "ubatch_size": _refused("dual-batch overlap of a text model's micro-batches"),
        "enable_elastic_ep": _refused(_EXPERT_PARALLEL),
        "elastic_ep_max_dp_size": _refused(_EXPERT_PARALLEL),
        "dbo_decode_token_threshold": _refused(
            "dual-batch overlap of a text model's micro-batches"
        ),
        "dp_sync_interval": _refused(_DATA_PARALLEL),
        "dbo_prefill_token_threshold": _refused(
            "dual-batch overlap of a text model's micro-batches"
        ),
        "disable_nccl_for_dp_synchronization": _refused(_DATA_PARALLEL),
        "enable_eplb": _refused(_EXPERT_PARALLEL),
        "eplb_config": _refused(_EXPERT_PARALLEL),
        "expert_placement_strategy": _refused(_EXPERT_PARALLEL),
        "max_parallel_loading_workers": _refused(_LOAD),
        "ray_workers_use_nsight": _refused(f"{_ENGINE_CORE} (its Ray workers)"),
        "disable_custom_all_reduce": _refused(f"{_ENGINE_CORE} (its all-reduce kernel)"),
        "worker_cls": _refused(f"{_ENGINE_CORE} (its worker class)"),
        "worker_extension_cls": _refused(f"{_ENGINE_CORE} (its worker class)"),
        "enable_fault_tolerance": _refused(f"{_ENGINE_CORE} (its recovery)"),
        "fault_tolerance_config": _refused(f"{_ENGINE_CORE} (its recovery)"),
    },
    "CacheConfig": {
        "block_size": _refused(_KV_CACHE),
        "gpu_memory_utilization": _refused(
            "the share of GPU memory vLLM gives a text model and its KV cache: the image engines "
            "take what the model needs (less: --enable-cpu-offload, --vae-use-tiling)"
        ),
        "kv_cache_memory_bytes": _refused(_KV_CACHE),
        "kv_cache_dtype": _refused(_KV_CACHE),
        "num_gpu_blocks_override": _refused(_KV_CACHE),
        "enable_prefix_caching": _refused(_KV_CACHE),
        "prefix_caching_hash_algo": _refused(_KV_CACHE),
        "prefix_cache_retention_interval": _refused(_KV_CACHE),
        "kv_cache_dtype_skip_layers": _refused(_KV_CACHE),
        "kv_sharing_fast_prefill": _refused(_KV_CACHE),
        "mamba_cache_dtype": _refused(_MAMBA),
        "mamba_ssm_cache_dtype": _refused(_MAMBA),
        "mamba_block_size": _refused(_MAMBA),
        "prefix_match_unit": _refused(_KV_CACHE),
        "mamba_cache_mode": _refused(_MAMBA),
        "enable_mamba_fine_grained_prefix_cache": _refused(_MAMBA),
        "replayssm_buffer_len": _refused(_MAMBA),
        "use_replayssm": _refused(_MAMBA),
        "kv_offloading_size": _refused(_KV_CACHE),
        "kv_offloading_backend": _refused(_KV_CACHE),
    },
    "OffloadConfig": {
        "offload_backend": _refused(_CPU_OFFLOAD),
        "cpu_offload_gb": _refused(_CPU_OFFLOAD),
        "cpu_offload_params": _refused(_CPU_OFFLOAD),
        "offload_group_size": _refused(_CPU_OFFLOAD),
        "offload_num_in_group": _refused(_CPU_OFFLOAD),
        "offload_prefetch_step": _refused(_CPU_OFFLOAD),
        "offload_params": _refused(_CPU_OFFLOAD),
    },
    "MultiModalConfig": {
        "language_model_only": _refused(_MULTIMODAL),
        "limit_mm_per_prompt": _refused(_MULTIMODAL),
        "enable_mm_embeds": _refused(_MULTIMODAL),
        "media_io_kwargs": _refused(_MULTIMODAL),
        "mm_processor_kwargs": _refused(_MULTIMODAL),
        "mm_processor_cache_gb": _refused(_MULTIMODAL),
        "mm_processor_cache_type": _refused(_MULTIMODAL),
        "mm_hasher_algorithm": _refused(_MULTIMODAL),
        "mm_shm_cache_max_object_size_mb": _refused(_MULTIMODAL),
        "mm_encoder_only": _refused(_MULTIMODAL),
        "mm_encoder_tp_mode": _refused(_MULTIMODAL),
        "mm_encoder_attn_backend": _refused(_MULTIMODAL),
        "mm_encoder_attn_dtype": _refused(_MULTIMODAL),
        "mm_encoder_fp8_scale_path": _refused(_MULTIMODAL),
        "mm_encoder_fp8_scale_save_path": _refused(_MULTIMODAL),
        "mm_encoder_fp8_scale_save_margin": _refused(_MULTIMODAL),
        "interleave_mm_strings": _refused(_MULTIMODAL),
        "skip_mm_profiling": _refused(_MULTIMODAL),
        "video_pruning_rate": _refused(_MULTIMODAL),
        "video_pruning_method": _refused(_MULTIMODAL),
        "mm_tensor_ipc": _refused(_MULTIMODAL),
        "mm_processor_device": _refused(_MULTIMODAL),
        "mm_ipc_gpu_memory_gb": _refused(_MULTIMODAL),
        "mm_device_do_normalize": _refused(_MULTIMODAL),
    },
    "LoRAConfig": {
        "enable_lora": _honoured("requests and --lora-modules may use LoRA adapters on the model"),
        "max_loras": _honoured(
            "most LoRA adapters loaded into the model at once (a batch runs one of them)"
        ),
        "max_lora_rank": _honoured("adapters above this rank are refused at load"),
        "lora_dtype": _refused("the dtype of vLLM's text LoRA weights: adapters load at --dtype"),
        "enable_tower_connector_lora": _refused(_LORA_TEXT),
        "max_cpu_loras": _honoured(
            "most LoRA adapters kept read in host memory, least recently used evicted"
        ),
        "fully_sharded_loras": _refused(_LORA_TEXT),
        "lora_target_modules": _refused(_LORA_TEXT),
        "default_mm_loras": _refused(_LORA_TEXT),
        "specialize_active_lora": _refused(_LORA_TEXT),
        "enable_mixed_moe_lora_format": _refused(_LORA_TEXT),
        "enable_moe_shared_loras": _refused(_LORA_TEXT),
    },
    "ObservabilityConfig": {
        "show_hidden_metrics_for_version": _refused(_TRACING),
        "otlp_traces_endpoint": _refused(_TRACING),
        "collect_detailed_traces": _refused(_TRACING),
        "per_request_spec_decode_metrics": _refused(_SPECULATIVE),
        "kv_cache_metrics": _refused(_KV_CACHE),
        "kv_cache_metrics_sample": _refused(_KV_CACHE),
        "cudagraph_metrics": _refused(_COMPILATION),
        "enable_layerwise_nvtx_tracing": _refused(_TRACING),
        "enable_mfu_metrics": _refused(_TRACING),
        "enable_logging_iteration_details": _refused(_TRACING),
        "jit_monitor_mode": _refused(_COMPILATION),
        "jit_monitor_verbose": _refused(_COMPILATION),
    },
    "SchedulerConfig": {
        "max_num_batched_tokens": _refused(_SCHEDULER),
        "max_num_scheduled_tokens": _refused(_SCHEDULER),
        "max_num_seqs": _refused(
            "vLLM's batch of text sequences: use --image-max-batch-size (images per pipeline call)"
        ),
        "max_num_queued_reqs": _refused(
            "vLLM's queue of text requests: use --image-max-queue (waiting images)"
        ),
        "max_num_queued_tokens": _refused(_SCHEDULER),
        "long_prefill_token_threshold": _refused(_SCHEDULER),
        "scheduling_policy": _refused(
            "vLLM's scheduling of text requests: image requests run oldest first, with no priority"
        ),
        "enable_chunked_prefill": _refused(_SCHEDULER),
        "disable_chunked_mm_input": _refused(_SCHEDULER),
        "scheduler_cls": _refused(_SCHEDULER),
        "scheduler_reserve_full_isl": _refused(_SCHEDULER),
        "watermark": _refused(_KV_CACHE),
        "prefill_schedule_interval": _refused(_SCHEDULER),
        "disable_hybrid_kv_cache_manager": _refused(_KV_CACHE),
        "async_scheduling": _refused(_SCHEDULER),
        "stream_interval": _refused(
            "tokens between text stream chunks: --task image streams a partial image per preview"
        ),
    },
    "CompilationConfig": {
        "cudagraph_capture_sizes": _refused(_COMPILATION),
        "max_cudagraph_capture_size": _refused(_COMPILATION),
    },
    "KernelConfig": {
        "ir_op_priority": _refused(_KERNELS),
        "enable_flashinfer_autotune": _refused(_KERNELS),
        "moe_backend": _refused(_KERNELS),
        "linear_backend": _refused(_KERNELS),
        "sparse_indexer_topk_backend": _refused(_KERNELS),
    },
    "VllmConfig": {
        "speculative_config": _refused(_SPECULATIVE),
        "spec_method": _refused(_SPECULATIVE),
        "spec_model": _refused(_SPECULATIVE),
        "spec_tokens": _refused(_SPECULATIVE),
        "watermark_config": _refused("watermarks generated text"),
        "diffusion_config": _refused(
            "discrete diffusion language models (text): image diffusion is the ImageTask group's"
        ),
        "kv_transfer_config": _refused(_KV_CACHE),
        "kv_events_config": _refused(_KV_CACHE),
        "ec_transfer_config": _refused(_MULTIMODAL),
        "ec_manager_config": _refused(_MULTIMODAL),
        "compilation_config": _refused(_COMPILATION),
        "attention_config": _refused(
            "vLLM's attention of a text model: use --diffusion-attention-backend (vllm-omni engine)"
        ),
        "engram_config": _refused(_ENGINE_CORE),
        "reasoning_config": _refused("reasoning of chat models: the Images API has none"),
        "kernel_config": _refused(_KERNELS),
        "additional_config": _refused(f"{_ENGINE_CORE} (its platform's extra settings)"),
        "structured_outputs_config": _refused("structured (JSON, grammar) text outputs"),
        "profiler_config": _refused(
            f"{_ENGINE_CORE} (its /start_profile and /stop_profile routes)"
        ),
        "optimization_level": _refused(_COMPILATION),
        "performance_mode": _refused(_COMPILATION),
        "weight_transfer_config": _refused("weight updates of a text engine (RL training)"),
    },
}
"""vLLM's serve flags by argument group (the titles `vllm serve --help` shows), each by
argparse dest, in the parser's order."""


_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)\.(\s|$)")


def _first_sentence(text: str) -> str:
    """The first sentence of a flag's help, without its full stop: the table's one line."""
    text = " ".join(text.split())
    match = _SENTENCE_END.search(text)
    sentence = text[: match.start()] if match else text
    return sentence[:1].lower() + sentence[1:]  # as the other rows of the table read


def _image_task_actions() -> list[argparse.Action]:
    """This plugin's flags, from a bare parser: argparse alone, no vLLM."""
    parser = argparse.ArgumentParser(add_help=False)
    add_image_cli_args(parser)
    return list(parser._actions)


_IMAGE_TASK_ACTIONS = _image_task_actions()

SERVE_GROUPS: Mapping[str, Mapping[str, FlagRule]] = {
    **_VLLM_GROUPS,
    # This plugin's own flags (cli_args.py): honoured by definition, so read from cli_args
    # rather than listed twice.
    HELP_GROUP: {
        action.dest: _honoured(_first_sentence(action.help or action.dest))
        for action in _IMAGE_TASK_ACTIONS
    },
}
"""`SERVE_FLAGS` by the argument group `vllm serve --help` shows it in."""

SERVE_FLAGS: Mapping[str, FlagRule] = {
    dest: rule for rules in SERVE_GROUPS.values() for dest, rule in rules.items()
}
"""Every `vllm serve` flag by argparse dest, in the parser's order."""


def _long_option(action: argparse.Action) -> str:
    """How the user spells the flag: its first long option (`--max-model-len`; a positional
    has none, so its dest)."""
    longs = [option for option in action.option_strings if option.startswith("--")]
    return longs[0] if longs else action.dest


_FLAG_NAMES = {action.dest: _long_option(action) for action in _IMAGE_TASK_ACTIONS}


def flag_name(dest: str) -> str:
    """The flag of a `SERVE_FLAGS` key as `vllm serve` spells it, without its parser: vLLM's
    flags are their dest with dashes (a test checks it against the parser); `model_tag` is the
    positional model."""
    if dest == "model_tag":
        return "<model>"
    return _FLAG_NAMES.get(dest) or "--" + dest.replace("_", "-")


def _classified_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            yield action


def _default(parser: argparse.ArgumentParser, action: argparse.Action) -> object:
    """The value a flag has when it is not given: argparse converts a string default with the
    flag's `type`, so compare with what it converts to."""
    default = parser.get_default(action.dest)
    if isinstance(default, str) and action.type is not None:
        return parser._get_value(action, default)
    return default


def _asks_for_something(value: object, default: object, also_accepts: Sequence[object]) -> bool:
    # Equality, not identity: a list or a config given with the default's value asks nothing.
    if value is default or value == default:
        return False
    return not any(value == accepted for accepted in also_accepts)


def refused_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The refused flags that `args` sets to something other than their default, as the user
    spells them (`--max-model-len`), in the parser's order.

    A BooleanOptionalAction whose default is None counts whichever way it is given
    (`--enable-prefix-caching` and `--no-enable-prefix-caching`); one that restates its
    default (`--no-enable-log-outputs`) asks for nothing and does not count."""
    flags: list[str] = []
    for action in _classified_actions(parser):
        rule = SERVE_FLAGS.get(action.dest)
        if rule is None or rule.verdict is not Verdict.REFUSED:
            continue
        value = getattr(args, action.dest, None)
        if _asks_for_something(value, _default(parser, action), rule.also_accepts):
            flags.append(_long_option(action))
    return flags


def refusal_message(flags: Sequence[str]) -> str:
    """The one log line that stops the server for `flags` (from `refused_flags`)."""
    names = ", ".join(flags)
    if len(flags) == 1:
        return (
            f"{names}: the image task (--task image) cannot honour this vLLM flag; "
            'drop it (docs/image_api.md, "vLLM\'s serve flags", says why and what to use '
            "instead)."
        )
    return (
        f"{names}: the image task (--task image) cannot honour these vLLM flags; "
        'drop them (docs/image_api.md, "vLLM\'s serve flags", says why and what to use '
        "instead)."
    )


def unclassified(parser: argparse.ArgumentParser) -> list[str]:
    """The dests of `parser`'s flags that `SERVE_FLAGS` does not classify (help aside)."""
    return [action.dest for action in _classified_actions(parser) if action.dest not in SERVE_FLAGS]


def _markdown_text(text: str) -> str:
    """`text` as one table cell: `|` escaped, and `<` too outside code spans (a help's
    `<random name>` would read as an HTML tag)."""
    parts = text.replace("|", "\\|").split("`")
    parts[::2] = [part.replace("<", "\\<") for part in parts[::2]]
    return "`".join(parts)


def markdown_table() -> str:
    """docs/image_api.md's table of every flag: one row each (flag, verdict, how), under a
    bold row per argument group."""
    rows = ["| flag | with `--task image` | how |", "|---|---|---|"]
    for group, rules in SERVE_GROUPS.items():
        rows.append(f"| **{group}** | | |")
        for dest, rule in rules.items():
            rows.append(
                f"| `{flag_name(dest)}` | {rule.verdict.value} | {_markdown_text(rule.how)} |"
            )
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    cli = argparse.ArgumentParser(
        prog="python -m vllm_omni_images.server.serve_flags",
        description="What `vllm serve --task image` does with each of vLLM's serve flags.",
    )
    cli.add_argument(
        "--markdown", action="store_true", help="print docs/image_api.md's table of the flags"
    )
    options = cli.parse_args(argv)
    if options.markdown:
        sys.stdout.write(markdown_table())
        return
    honoured = sum(rule.verdict is Verdict.HONOURED for rule in SERVE_FLAGS.values())
    print(f"{honoured} honoured, {len(SERVE_FLAGS) - honoured} refused (--markdown: the table)")


if __name__ == "__main__":
    main()
