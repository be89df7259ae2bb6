"""What the image task does with vLLM's serve flags, by argparse dest: the data `serve_flags` reads.

A flag in `HONOURED` is done by the server; every other flag is refused, for its `OVERRIDES`
reason or else its argument group's (`GROUP_REASONS`, `FALLBACK_REASON`). This plugin's own
ImageTask group is honoured by definition (`serve_flags`).
"""

from __future__ import annotations

from collections.abc import Mapping


def _each(how: str, *dests: str) -> dict[str, str]:
    return dict.fromkeys(dests, how)


_CHAT = "chat completions only: the Images API has no chat template or roles"
_TOOLS = "tool calling of chat models: the Images API has no tools"
_TOKENS = "about a text model's tokens: a diffusion model's answers are images"
_TOKENIZER = "a text model's tokenizer: a diffusion pipeline loads its own, from its folder"
_LOGITS = "token sampling of a text model: the image engines sample no tokens"
_KV_CACHE = "vLLM's KV cache of a text model: the image engines keep none"
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
_SCHEDULER = (
    "vLLM's token scheduler: images are scheduled by --image-max-batch-size, "
    "--image-batch-delay-ms and --image-max-queue"
)
_COMPILATION = (
    "vLLM's torch.compile and CUDA graphs of a text model: --enforce-eager turns vllm-omni's "
    "compilation off"
)
_ENGINE_CORE = "vLLM's text engine core, which the image task does not start"
_LORA_TEXT = "LoRA of vLLM's text layers: diffusion adapters are loaded by the image engines"
_LOAD = "vLLM's weight loader: the image engines load through diffusers or vllm-omni"
_CORS = "CORS, by vLLM's middleware on the image routes too"
_TLS = "TLS of the HTTP server (vLLM's serve_http)"
_DP_SUPERVISOR = "vLLM's data-parallel supervisor: an image server has one engine"
_QUANTIZATION = (
    "vLLM's quantization of a text model: use --diffusion-quantization-config (vllm-omni engine)"
)
_GENERATION_CONFIG = (
    "a text model's generation_config.json: request defaults come from the pipeline "
    "(its folder's vllm_omni_images.json)"
)
_ATTENTION = (
    "vLLM's attention of a text model: use --diffusion-attention-backend (vllm-omni engine)"
)
_DBO = "dual-batch overlap of a text model's micro-batches"
_FINGERPRINT = "system_fingerprint of text answers"
_COHERE = "the Cohere chat API of text models"
_MODEL = "the model: a diffusers pipeline folder, a hub id, or tiny-qwen-image"

HONOURED: Mapping[str, str] = {
    # positional arguments, options
    "model_tag": _MODEL,
    "config": "a YAML file of flags, read by vLLM's parser: each is judged here as if given",
    "disable_log_stats": "stops vLLM's periodic stats call (the image metrics stay on /metrics)",
    "shutdown_timeout": (
        "on SIGTERM/SIGINT, seconds accepted requests may finish before the engine closes"
    ),
    "enable_log_requests": (
        "each image request is logged in one line (id, size, n, steps, timings), with or "
        "without it; prompts never are"
    ),
    # Frontend: vLLM's app and HTTP server do these for the image routes too.
    "lora_modules": (
        "LoRA adapters loaded at start-up, each served under its name (/v1/models, `model`)"
    ),
    "log_config_file": "uvicorn's logging config (JSON) for the HTTP server",
    "enable_server_load_tracking": "/load counts the image requests in flight",
    "sse_keep_alive_interval": (
        "seconds without an event after which a streamed image request gets vLLM's "
        "keep-alive comment"
    ),
    "log_error_stack": "a failed image request's log line carries its traceback",
    "host": "the address the server listens on",
    "port": "the port the server listens on",
    "uds": "listen on this Unix socket instead of --host/--port",
    "uvicorn_log_level": "uvicorn's log level",
    "disable_uvicorn_access_log": "no access log lines",
    "disable_access_log_for_endpoints": (
        "no access log lines for these paths (comma-separated, e.g. /health,/metrics)"
    ),
    **_each(_CORS, "allow_credentials", "allowed_origins", "allowed_methods", "allowed_headers"),
    "api_key": (
        "/v1/* needs `Authorization: Bearer <key>` (image URLs, outside /v1, are their own key)"
    ),
    **_each(_TLS, "ssl_keyfile", "ssl_certfile", "ssl_ca_certs"),
    "enable_ssl_refresh": "reloads the TLS files when they change",
    **_each(_TLS, "ssl_cert_reqs", "ssl_ciphers"),
    "root_path": "FastAPI's root path, behind a path-based proxy",
    "middleware": "ASGI middleware (a class or an http function) added to the app",
    "enable_request_id_headers": "answers carry an X-Request-Id header",
    "disable_fastapi_docs": "no /docs, /redoc or /openapi.json",
    "h11_max_incomplete_event_size": (
        "the most bytes of a request head not yet complete; more is a 431 (uvicorn's httptools "
        "protocol ignores it: this package's reads it, server/http_protocol.py)"
    ),
    "h11_max_header_count": (
        "the most headers of a request; more is a 431 (read by this package's HTTP protocol: "
        "uvicorn reads it nowhere)"
    ),
    "enable_offline_docs": "/docs from vendored assets, for air-gapped machines",
    # ModelConfig, LoadConfig: the launcher hands these to the engines.
    "model": _MODEL,
    "trust_remote_code": "a pipeline's own code (custom pipelines) may run, in both engines",
    "dtype": "both engines' weight dtype; auto: float32 on the CPU, bfloat16 on a GPU",
    "seed": "seeds the server's draw of random seeds for requests without a seed",
    "allowed_media_domains": (
        "edits and variations fetch http(s) image URLs from these hosts only (none: never)"
    ),
    "revision": "the model's revision on the hub, for both engines",
    "enforce_eager": "vllm-omni engine: no torch.compile (the diffusers engine never compiles)",
    "served_model_name": "the names /v1/models lists and a request's `model` may use",
    "hf_token": "the hub token for gated or private models, for both engines",
    "download_dir": "where hub models are downloaded to, for both engines",
    # ParallelConfig
    "distributed_executor_backend": (
        "vllm-omni engine: mp, uni, or a DiffusionExecutor class's path"
    ),
    "tensor_parallel_size": (
        "vllm-omni engine: tensor parallelism of the DiT (the diffusers engine refuses > 1)"
    ),
    # LoRAConfig
    "enable_lora": "requests and --lora-modules may use LoRA adapters on the model",
    "max_loras": "most LoRA adapters loaded into the model at once (a batch runs one of them)",
    "max_lora_rank": "adapters above this rank are refused at load",
    "max_cpu_loras": "most LoRA adapters kept read in host memory, least recently used evicted",
}
"""The flags the image task honours, each with how, in one line."""

GROUP_REASONS: Mapping[str, str] = {
    "options": "an option of vLLM's text server",
    "Frontend": "vLLM's frontend of text generation (chat, completions, tokens)",
    "ModelConfig": "a setting of a text model: a diffusion pipeline is set by its folder",
    "LoadConfig": _LOAD,
    "AttentionConfig": _ATTENTION,
    "MambaConfig": "Mamba (state-space) text models only",
    "StructuredOutputsConfig": (
        "structured outputs and reasoning of chat models: the Images API has neither"
    ),
    "ParallelConfig": f"{_ENGINE_CORE} (its parallelism)",
    "CacheConfig": "vLLM's KV and state caches of a text model: the image engines keep none",
    "OffloadConfig": (
        "vLLM's weight offload of a text model: use --enable-cpu-offload or "
        "--enable-layerwise-offload (vllm-omni engine)"
    ),
    "MultiModalConfig": _MULTIMODAL,
    "LoRAConfig": _LORA_TEXT,
    "ObservabilityConfig": (
        "vLLM's engine tracing and metrics: the image server's metrics are vllm:image_* on /metrics"
    ),
    "SchedulerConfig": _SCHEDULER,
    "CompilationConfig": _COMPILATION,
    "KernelConfig": "vLLM's kernels for text models: the image engines choose their own",
    "VllmConfig": _ENGINE_CORE,
}
"""Why the image task refuses the flags of each argument group (`vllm serve --help` titles)."""

FALLBACK_REASON = "a vLLM flag the image task does not know, so cannot honour"
"""Why a flag of a group that `GROUP_REASONS` lacks (new in a vLLM release) is refused."""

OVERRIDES: Mapping[str, str] = {
    # options
    "headless": (
        "runs vLLM engines without an API server: an image server is its API and its engine"
    ),
    "api_server_count": "one API process serves the image engine; more would each load the model",
    "grpc": "vLLM's gRPC server speaks text generation: the Images API is HTTP",
    "aggregate_engine_logging": "aggregates the stats logs of vLLM's data-parallel text engines",
    "fail_on_environ_validation": (
        "vLLM checks VLLM_* variables when it builds a text engine config, which the image "
        "task does not"
    ),
    "gdn_prefill_backend": "kernels of a text model's GDN layers",
    **_each("kernels of a text model's KDA layers", "kda_prefill_backend", "kda_decode_backend"),
    # Frontend
    **_each(
        _CHAT,
        "chat_template",
        "chat_template_content_format",
        "trust_request_chat_template",
        "default_chat_template_kwargs",
        "response_role",
    ),
    **_each(
        _TOOLS,
        "enable_auto_tool_choice",
        "exclude_tools_when_tool_choice_none",
        "tool_call_parser",
        "tool_parser_plugin",
        "tool_server",
    ),
    **_each(
        _TOKENS,
        "return_tokens_as_token_ids",
        "enable_prompt_tokens_details",
        "enable_force_include_usage",
        "tokens_only",
    ),
    "max_log_len": (
        "shortens the prompts in vLLM's request log: the image request log holds no prompt"
    ),
    "enable_per_request_metrics": (
        "per-request token metrics of text answers: image timings are in the request log line "
        "and on /metrics"
    ),
    "enable_tokenizer_info_endpoint": _TOKENIZER,
    "enable_log_outputs": "logs generated text: an image server generates none",
    "enable_log_deltas": "logs streamed text deltas: an image server streams none",
    **_each(_COHERE, "cohere_is_reasoning_model", "cohere_format"),
    "enable_scale_out": "vLLM's scale-out routes of text generation",
    **_each(_FINGERPRINT, "fingerprint_mode", "fingerprint_value"),
    **_each(
        _DP_SUPERVISOR,
        "data_parallel_supervisor_port",
        "dp_supervisor_probe_interval_s",
        "dp_supervisor_probe_timeout_s",
        "dp_supervisor_probe_failure_threshold",
    ),
    "enable_flash_late_interaction": "late-interaction scoring of pooling models",
    # ModelConfig
    "runner": "vLLM's text runners: --task image chooses the image engines",
    "convert": "converts a text model for pooling: a diffusion model is not one",
    **_each(_TOKENIZER, "tokenizer", "tokenizer_mode", "tokenizer_revision", "skip_tokenizer_init"),
    "hf_config_path": "a text model's config.json: a pipeline has model_index.json",
    "allowed_local_media_path": (
        "edit images are never read from server paths: send a file, a data: URL, or an "
        "http(s) URL from --allowed-media-domains"
    ),
    "code_revision": (
        "the revision of a text model's remote code: the image engines load code at --revision"
    ),
    "max_model_len": (
        "the context length of a text model: image sizes are limited by --image-max-pixels"
    ),
    **_each(_QUANTIZATION, "quantization", "quantization_config", "allow_deprecated_quantization"),
    "enable_return_routed_experts": _EXPERT_PARALLEL,
    **_each(
        _LOGITS,
        "return_sampling_mask",
        "max_logprobs",
        "logprobs_mode",
        "use_fp64_gumbel",
        "enable_trace_replay",
        "logits_processors",
    ),
    "disable_sliding_window": "sliding-window attention over a text model's tokens",
    "disable_cascade_attn": "cascade attention over a text model's shared prefixes",
    "enable_prompt_embeds": "prompt embeddings of a text model: send a prompt",
    "config_format": "a text model's config format: a pipeline has model_index.json",
    "hf_overrides": "overrides a text model's config.json",
    "model_class_overrides": "vLLM's text model classes: use --model-class-name (vllm-omni engine)",
    "pooler_config": "pooling models only",
    **_each(_GENERATION_CONFIG, "generation_config", "override_generation_config"),
    "enable_sleep_mode": (
        "vLLM's sleep and wake-up of a text engine: the image engines do not sleep"
    ),
    "enable_cumem_allocator": "the memory pool of vLLM's text engine (sleep mode)",
    "enable_nccl_comm_suspend": "suspends NCCL in vLLM's sleep mode",
    "model_impl": "vLLM's or transformers' text model classes",
    "io_processor_plugin": "vLLM's input/output processors of pooling models",
    "renderer_num_workers": "workers of vLLM's prompt renderer (chat templates)",
    # LoadConfig
    "load_format": (
        "vLLM's weight loader of a text model: use --diffusion-load-format (vllm-omni engine)"
    ),
    **_each(
        _LOAD,
        "safetensors_load_strategy",
        "safetensors_prefetch_num_threads",
        "safetensors_prefetch_block_size",
        "model_loader_extra_config",
        "ignore_patterns",
        "use_tqdm_on_load",
        "pt_load_map_location",
        "max_parallel_loading_workers",
    ),
    # ParallelConfig
    "pipeline_parallel_size": (
        "vLLM's pipeline parallelism of a text model: use --tensor-parallel-size, "
        "--ulysses-degree, --ring or --cfg-parallel-size (vllm-omni engine)"
    ),
    **_each(_MULTI_NODE, "master_addr", "master_port", "nnodes", "node_rank"),
    **_each(
        f"{_ENGINE_CORE} (its process groups)",
        "distributed_timeout_seconds",
        "cpu_distributed_timeout_seconds",
    ),
    **_each(
        f"{_ENGINE_CORE} (its workers' NUMA binding)",
        "numa_bind",
        "numa_bind_nodes",
        "numa_bind_cpus",
    ),
    "device_ids": f"{_ENGINE_CORE} (its workers' devices): choose GPUs with CUDA_VISIBLE_DEVICES",
    **_each(
        _CONTEXT_PARALLEL,
        "decode_context_parallel_size",
        "dcp_comm_backend",
        "dcp_q_replicate",
        "dcp_kv_cache_interleave_size",
        "cp_kv_cache_interleave_size",
        "prefill_context_parallel_size",
    ),
    **_each(
        _DATA_PARALLEL,
        "data_parallel_size",
        "data_parallel_rank",
        "data_parallel_start_rank",
        "data_parallel_size_local",
        "data_parallel_address",
        "data_parallel_rpc_port",
        "data_parallel_backend",
        "data_parallel_hybrid_lb",
        "data_parallel_external_lb",
        "data_parallel_multi_port_external_lb",
        "dp_sync_interval",
        "disable_nccl_for_dp_synchronization",
    ),
    **_each(
        _EXPERT_PARALLEL,
        "enable_expert_parallel",
        "enable_ep_weight_filter",
        "all2all_backend",
        "enable_elastic_ep",
        "elastic_ep_max_dp_size",
        "enable_eplb",
        "eplb_config",
        "expert_placement_strategy",
    ),
    "enable_batch_sharded_sampling": _LOGITS,
    **_each(
        _DBO,
        "enable_dbo",
        "ubatch_size",
        "dbo_decode_token_threshold",
        "dbo_prefill_token_threshold",
    ),
    "ray_workers_use_nsight": f"{_ENGINE_CORE} (its Ray workers)",
    "disable_custom_all_reduce": f"{_ENGINE_CORE} (its all-reduce kernel)",
    **_each(f"{_ENGINE_CORE} (its worker class)", "worker_cls", "worker_extension_cls"),
    **_each(f"{_ENGINE_CORE} (its recovery)", "enable_fault_tolerance", "fault_tolerance_config"),
    # LoRAConfig
    "lora_dtype": "the dtype of vLLM's text LoRA weights: adapters load at --dtype",
    **_each(
        _LORA_TEXT,
        "enable_tower_connector_lora",
        "fully_sharded_loras",
        "lora_target_modules",
        "default_mm_loras",
        "specialize_active_lora",
        "enable_mixed_moe_lora_format",
        "enable_moe_shared_loras",
    ),
    # Groups without honoured flags: a better hint than the group's reason.
    "gpu_memory_utilization": (
        "the share of GPU memory vLLM gives a text model and its KV cache: the image engines "
        "take what the model needs (less: --enable-cpu-offload, --vae-use-tiling)"
    ),
    "max_num_seqs": (
        "vLLM's batch of text sequences: use --image-max-batch-size (images per pipeline call)"
    ),
    "max_num_queued_reqs": "vLLM's queue of text requests: use --image-max-queue (waiting images)",
    "scheduling_policy": (
        "vLLM's scheduling of text requests: image requests run oldest first, with no priority"
    ),
    "stream_interval": (
        "tokens between text stream chunks: --task image streams a partial image per preview"
    ),
    **_each(_COMPILATION, "compilation_config", "optimization_level", "performance_mode"),
    "attention_config": _ATTENTION,
    "diffusion_config": (
        "discrete diffusion language models (text): image diffusion is the ImageTask group's"
    ),
}
"""Per-flag reasons for refusing, where one says more than the flag's group reason."""

SINGLE_VALUE: Mapping[str, object] = {
    "api_server_count": 1,
    "pipeline_parallel_size": 1,
    "data_parallel_size": 1,
}
"""Refused flags that ask for nothing beyond their default at this value
(`--api-server-count 1`)."""
