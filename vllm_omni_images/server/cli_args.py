"""The `vllm serve` flags this plugin adds (`ImageTaskArgs`, `OMNI_FLAGS`), and how to tell that a
command line asks for them. Imported in every vLLM process: it imports nothing heavy."""

import argparse
import ast
import inspect
import itertools
import json
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from vllm_omni_images.engine.memory_budget import AUTO
from vllm_omni_images.engine.names import ENGINE_NAMES, EngineName
from vllm_omni_images.images.limits import ImageLimits, MiB
from vllm_omni_images.images.response_formats import DEFAULT_RESPONSE_FORMATS, DefaultResponseFormat

if TYPE_CHECKING:
    from vllm_omni_images.engine.base import AdapterDefaults
    from vllm_omni_images.engine.batching import BatchingConfig
    from vllm_omni_images.engine.client import AdmissionConfig

IMAGE_TASK = "image"
HELP_GROUP = "ImageTask"  # `vllm serve --help=ImageTask` lists the image options
IMAGE_URL_MODES = ("server", "presigned")
DEFAULT_STORE_MAX_MB = 1024.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"must be an http(s)://host[/path] URL, got {text}")
    return text.rstrip("/")


def _pixels(text: str) -> int:
    """A number of pixels as a product: `4194304`, `2048x2048` or `4x2048x2048` (n x width x
    height)."""
    try:
        factors = [int(factor) for factor in text.lower().split("x")]
    except ValueError:
        factors = [-1]
    if min(factors) < 0:
        raise argparse.ArgumentTypeError(
            f"must be a number of pixels or [Nx]WIDTHxHEIGHT, got {text}"
        )
    return math.prod(factors)


def _pixel_count(text: str) -> int:
    """A number of pixels (`_pixels`), at least one."""
    value = _pixels(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {text}")
    return value


def _pixel_budget(text: str) -> int | Literal["auto"] | None:
    """`auto`, `0` (no budget: `None`) or a number of pixels (`_pixels`)."""
    if text.strip().lower() == AUTO:
        return AUTO
    return _pixels(text) or None


def _lora_defaults(text: str) -> "dict[str, AdapterDefaults]":
    from vllm_omni_images.images.adapter_defaults import defaults_by_adapter

    return defaults_by_adapter(text)


def _mib_bytes(mib: float) -> int:
    return max(1, int(mib * MiB)) if math.isfinite(mib) else sys.maxsize


@dataclass(frozen=True)
class ImageTaskArgs:
    """Serve a diffusion model through the OpenAI Images API with `--task image` (from the
    vllm-omni-images plugin)."""

    # Each field is a flag (`--image-max-queue`): its docstring is the help, its metadata the
    # other argparse options (a checking `type`, `choices`, `metavar`).
    task: Literal["image"] | None = field(default=None, metadata={"choices": [IMAGE_TASK]})
    """Serve the model for this task instead of text generation. `image` serves the OpenAI
    Images API (POST /v1/images/generations) for a diffusion model; the model may be a
    diffusers pipeline folder, a hub id, or `tiny-qwen-image` (a tiny embedded model that
    needs no download)."""
    image_engine: EngineName = field(default="auto", metadata={"choices": ENGINE_NAMES})
    """Which engine runs the diffusion model. `omni` is vllm-omni's diffusion engine (its
    pipelines, batching, parallelism, caches, offload; on a GPU, or on the CPU through this
    package's platform plugin); `diffusers` serves any diffusers pipeline on CPU or GPU; `auto`
    picks omni when vllm-omni finds a GPU and has the model's pipeline (model_index.json's
    class) in its registry, diffusers otherwise, and logs why."""
    image_max_batch_size: int = field(default=4, metadata={"type": _positive_int})
    """Most images generated in one pipeline call. Compatible requests (same size, steps and
    guidance) share a call; a request's `n` images count each. 1 turns batching off. A single
    request with more images still runs, alone."""
    image_batch_delay_ms: float = field(default=0.0, metadata={"type": _non_negative_float})
    """How long an idle engine holds a batch that is not full, waiting for compatible company
    (counted from the arrival of its oldest request). Batches form anyway from requests that
    queue while the engine is busy, so 0 adds no latency to a lone request; a few ms can group
    bursts that arrive at an idle engine."""
    image_max_queue: int = field(default=256, metadata={"type": _positive_int})
    """Most images waiting for the engine. Beyond it requests get 429 with a Retry-After
    header."""
    image_request_timeout: float = field(default=600.0, metadata={"type": _non_negative_float})
    """Seconds a request may wait and run before it fails with a timeout error (504); its work
    stops at the next denoising step. 0 means no limit."""
    image_engine_hang_grace: float = field(default=60.0, metadata={"type": _non_negative_float})
    """Seconds an engine call may go on after every request in it timed out or went away (it
    is asked to stop at its next denoising step). Past that the engine is taken as hung:
    /health answers 503 and requests fail with 503 until the call returns. Raise it where one
    step (or the VAE decode) can take longer, e.g. a large model on a CPU; 0 turns the check
    off."""
    image_max_pixels_in_flight: int | Literal["auto"] | None = field(
        default=AUTO, metadata={"type": _pixel_budget, "metavar": "auto|0|[Nx]WIDTHxHEIGHT"}
    )
    """Most image pixels the engine holds in memory at once: in one pipeline call, and (omni)
    handed to vllm-omni. Requests beyond it wait their turn; one whose images alone are more
    is a 400 that says the largest n and size that fit. `auto`: on the CPU, 75% of the memory
    available once the model is loaded, divided by the model's measured bytes per megapixel
    (docs/performance.md, "Memory"); on a GPU, or for a model not measured, no budget. 0: no
    budget."""
    image_store_dir: str | None = None
    """Folder for the images of `response_format: url` requests (served at /images/files/<random
    name> without an API key: the URL is the secret). Default: a new temporary folder per
    server."""
    image_store_url: str | None = field(default=None, metadata={"metavar": "s3://BUCKET[/PREFIX]"})
    """Keep the images of `response_format: url` requests in an S3-compatible bucket instead of
    a local folder, so that every replica sharing it answers every URL. Configured by the
    standard AWS_* environment (credentials, AWS_REGION, AWS_ENDPOINT_URL for MinIO, Ceph, R2,
    GCS); the bucket must exist. See docs/deployment.md."""
    image_urls: Literal["server", "presigned"] = field(
        default="server", metadata={"choices": IMAGE_URL_MODES}
    )
    """What an image URL points at: `server`, the server's own /images/files/<name> (any
    replica answers it from the store); or `presigned`, a presigned URL of the object in the
    --image-store-url bucket, valid for --image-url-ttl (at most 7 days)."""
    image_url_base: str | None = field(default=None, metadata={"type": _http_url, "metavar": "URL"})
    """The public address image URLs start with (with --image-urls server):
    <URL>/images/files/<name>. Default: the address the request came to, with vLLM's
    --root-path. Set it behind a router that does not pass the client's Host on
    (production-stack's), to an address that reaches the replicas' /images/files/."""
    image_default_response_format: DefaultResponseFormat = field(
        default="auto", metadata={"choices": DEFAULT_RESPONSE_FORMATS}
    )
    """The `response_format` of a request that names none: `b64_json` (inline) or `url`, for
    every model name; `auto`, OpenAI's rule by the name the request uses: `url` for a
    `dall-e-*` name (clients written for DALL-E read the URL), `b64_json` for any other. A
    stream's images are always inline."""
    image_url_ttl: float = field(default=3600.0, metadata={"type": _positive_float})
    """Seconds an image URL works; then it answers 404 and the image is removed."""
    image_store_max_mb: float | None = field(default=None, metadata={"type": _positive_float})
    """Most disk the images in --image-store-dir may use; beyond it the oldest go first.
    Default: 1024. (A bucket's size is the store's to limit.)"""

    # What one request may ask for and send, refused before any work (docs/image_api.md).
    image_max_json_mb: float = field(default=1.0, metadata={"type": _positive_float})
    """Largest JSON body (generations), in MiB; a larger one is refused with 413 before it is
    read (from its Content-Length), or as soon as what was read passes it."""
    image_max_form_mb: float | None = field(default=None, metadata={"type": _positive_float})
    """Largest form body (edits, variations), in MiB, refused like a JSON body. Default: room
    for the input image and a mask at their largest, even as data: URLs, plus 1 MiB (4 x
    --image-max-input-mb + 1: 81 MiB)."""
    image_max_prompt_chars: int = field(default=32_000, metadata={"type": _positive_int})
    """Longest prompt (and negative_prompt), in characters; longer is a 400."""
    image_max_pixels: int | None = field(default=None, metadata={"type": _pixel_count})
    """Most pixels of one generated image (a number, or WIDTHxHEIGHT); a larger size is a 400.
    Default: the model's limit (2048x2048 unless its folder's vllm_omni_images.json says
    otherwise)."""
    image_max_request_pixels: int = field(default=4 * 2048 * 2048, metadata={"type": _pixel_count})
    """Most pixels of one request's images together (n x width x height; a number or
    WIDTHxHEIGHT); more is a 400 naming n. Default: four 2048x2048 images."""
    image_max_input_images: int = field(default=1, metadata={"type": _positive_int})
    """Most images one edit or variation may send (the mask aside); more is a 400, refused
    before any is decoded. It can only lower what the engines edit at once, one image: a
    larger value changes nothing (the log says so at start-up)."""
    image_max_input_mb: float = field(default=20.0, metadata={"type": _positive_float})
    """Largest input image or mask (a file, a data: URL, a fetched URL), in MiB; larger is a
    413."""
    image_max_input_pixels: int = field(default=4096 * 4096, metadata={"type": _pixel_count})
    """Most pixels of an input image or mask (a number or WIDTHxHEIGHT), read from its header
    before it is decoded; more is a 400."""

    # How long a client may take to send a request (docs/deployment.md, "Slow clients").
    image_header_timeout: float = field(default=30.0, metadata={"type": _non_negative_float})
    """Seconds a connection may take to send a request's head (request line and headers),
    counted from its opening or from its previous answer; past it the server closes the
    connection, with a 408 if part of a head came. (A connection idle after an answer is closed
    sooner: after VLLM_HTTP_TIMEOUT_KEEP_ALIVE seconds, 5, without a byte.) 0 turns it off."""
    image_body_timeout: float = field(default=120.0, metadata={"type": _non_negative_float})
    """Seconds the whole body of an Images API request may take to arrive, counted from its
    head's arrival; past it the request is a 408 and its connection is closed. Raise it where
    clients upload large edit images over slow links (at the default a 20 MiB image needs 1.4
    Mbit/s). 0 turns it off."""

    # Distilled (few-step) LoRA adapters (docs/image_api.md, "Per-adapter defaults").
    image_lora_defaults: "dict[str, AdapterDefaults] | None" = field(
        default=None, metadata={"type": _lora_defaults, "metavar": "JSON"}
    )
    """Default steps and guidance of adapters of --lora-modules, for the requests that name
    one and leave them unset (distilled few-step adapters). A JSON object by adapter name,
    e.g. '{"lightning": {"num_inference_steps": 8, "true_cfg_scale": 1.0}}'; its keys are
    num_inference_steps, guidance_scale and true_cfg_scale, each in the request's own range.
    `quality` scales an adapter's steps as it scales the model's; /v1/models shows them on
    the adapter's card; /v1/load_lora_adapter takes the same object as `defaults`."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ImageTaskArgs":
        """The image flags of a parsed `vllm serve` command line."""
        return cls(**{flag.name: getattr(args, flag.name) for flag in fields(cls)})

    def admission_config(self) -> "AdmissionConfig":
        from vllm_omni_images.engine.client import AdmissionConfig

        return AdmissionConfig(
            max_queue_images=self.image_max_queue,
            request_timeout_s=self.image_request_timeout or None,
        )

    def batching_config(self) -> "BatchingConfig":
        """For the engine that batches a diffusers pipeline, and vllm-omni's scheduler."""
        from vllm_omni_images.engine.batching import BatchingConfig

        return BatchingConfig(
            max_batch_size=self.image_max_batch_size,
            batch_delay_ms=self.image_batch_delay_ms,
            hang_grace_s=self.image_engine_hang_grace or None,
            max_pixels_in_flight=self.image_max_pixels_in_flight,
        )

    def image_limits(self) -> ImageLimits:
        form_mb = self.image_max_form_mb
        return ImageLimits(
            max_json_bytes=_mib_bytes(self.image_max_json_mb),
            max_form_bytes=None if form_mb is None else _mib_bytes(form_mb),
            max_prompt_chars=self.image_max_prompt_chars,
            max_pixels=self.image_max_pixels,
            max_request_pixels=self.image_max_request_pixels,
            max_input_images=self.image_max_input_images,
            max_input_bytes=_mib_bytes(self.image_max_input_mb),
            max_input_pixels=self.image_max_input_pixels,
            body_timeout_s=self.image_body_timeout or None,
        )

    @property
    def store_max_bytes(self) -> int:
        """The local folder's size limit (`--image-store-max-mb`, 1024 MiB if unset)."""
        return _mib_bytes(self.image_store_max_mb or DEFAULT_STORE_MAX_MB)


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _field_docs(cls: type) -> dict[str, str]:
    """The string after each field of `cls`, on one line (vLLM's `get_attr_docs`, without vLLM)."""
    [node] = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(node, ast.ClassDef)
    docs = {}
    for assign, doc in itertools.pairwise(node.body):
        if (
            isinstance(assign, ast.AnnAssign)
            and isinstance(assign.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[assign.target.id] = _one_line(doc.value.value)
    return docs


def add_image_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add `--task`, `ImageTaskArgs`' flags and `OMNI_FLAGS` to a serve parser (idempotent)."""
    if any("--task" in action.option_strings for action in parser._actions):
        return
    group = parser.add_argument_group(HELP_GROUP, _one_line(ImageTaskArgs.__doc__))
    docs = _field_docs(ImageTaskArgs)
    for flag in fields(ImageTaskArgs):
        group.add_argument(
            f"--{flag.name.replace('_', '-')}",
            default=flag.default,
            help=docs[flag.name].replace("%", "%%"),
            **flag.metadata,
        )
    # vllm-omni's own options, under the names `vllm serve --omni` gives them, so its command
    # lines carry over. Only the omni engine understands them (a start-up error otherwise).
    for omni_flag in OMNI_FLAGS:
        omni_options: dict[str, Any] = {
            "dest": omni_flag.dest,
            "default": None,
            **omni_flag.argparse,
        }
        if "action" not in omni_options:
            omni_options["metavar"] = omni_flag.config_field.upper()  # as vllm-omni's help
        group.add_argument(*omni_flag.flags, **omni_options)


def served_model_names(args: argparse.Namespace) -> list[str]:
    """`--served-model-name`, else the model; the first labels the metrics."""
    return [str(name) for name in args.served_model_name or [args.model]]


@dataclass(frozen=True)
class OmniFlag:
    """One vllm-omni option: its flags as vllm-omni spells them, and the config field it sets."""

    flags: tuple[str, ...]
    config_field: str
    argparse: dict[str, Any] = field(default_factory=dict)
    """`type` or `action`, `choices` and `help` (which starts "[omni engine]")."""

    @property
    def dest(self) -> str:
        return f"omni_{self.config_field}"


OMNI_FLAGS: tuple[OmniFlag, ...] = (
    OmniFlag(
        ("--ulysses-degree", "--usp"),
        "ulysses_degree",
        {"type": int, "help": "[omni engine] Ulysses sequence-parallel degree (GPUs)."},
    ),
    OmniFlag(
        ("--ring", "--ring-degree"),
        "ring_degree",
        {"type": int, "help": "[omni engine] Ring sequence-parallel degree (GPUs)."},
    ),
    OmniFlag(
        ("--cfg-parallel-size",),
        "cfg_parallel_size",
        {
            "type": int,
            "help": "[omni engine] GPUs that run the guidance passes in parallel (1 or 2).",
        },
    ),
    OmniFlag(
        ("--vae-patch-parallel-size",),
        "vae_patch_parallel_size",
        {"type": int, "help": "[omni engine] GPUs that split the VAE decode spatially."},
    ),
    OmniFlag(
        ("--cache-backend",),
        "cache_backend",
        {
            "type": str,
            "help": "[omni engine] Step-cache acceleration: tea_cache, cache_dit, mag_cache, "
            "sea_cache, step_cache.",
        },
    ),
    OmniFlag(
        ("--cache-config",),
        "cache_config",
        {"type": str, "help": "[omni engine] JSON settings of the cache backend."},
    ),
    OmniFlag(
        ("--enable-cpu-offload",),
        "enable_cpu_offload",
        {
            "action": "store_true",
            "help": "[omni engine] Swap text encoders and DiT between CPU and GPU.",
        },
    ),
    OmniFlag(
        ("--enable-layerwise-offload",),
        "enable_layerwise_offload",
        {"action": "store_true", "help": "[omni engine] Stream the DiT's layers from CPU memory."},
    ),
    OmniFlag(
        ("--vae-use-tiling",),
        "vae_use_tiling",
        {
            "action": "store_true",
            "help": "[omni engine] Decode in tiles, for large images on little memory.",
        },
    ),
    OmniFlag(
        ("--vae-use-slicing",),
        "vae_use_slicing",
        {"action": "store_true", "help": "[omni engine] Decode a batch one image at a time."},
    ),
    OmniFlag(
        ("--step-execution",),
        "step_execution",
        {
            "action": "store_true",
            "help": "[omni engine] Schedule by denoising step: a request that arrives while "
            "a batch denoises joins it at the next step (vllm-omni's step-level batching).",
        },
    ),
    OmniFlag(
        ("--diffusion-streaming-output",),
        "diffusion_streaming_output",
        {
            "action": "store_true",
            "help": "[omni engine] Serve partial_images (streamed previews): vllm-omni's "
            "chunked streaming output, a chunk ending at each preview step. It runs the "
            "engine in step mode, which costs plain requests too (docs/performance.md).",
        },
    ),
    OmniFlag(
        ("--diffusion-attention-backend",),
        "diffusion_attention_backend",
        {
            "type": str,
            "help": "[omni engine] Attention backend of the diffusion model, e.g. FLASH_ATTN.",
        },
    ),
    OmniFlag(
        ("--diffusion-quantization-config",),
        "diffusion_quantization_config",
        {"type": json.loads, "help": "[omni engine] JSON quantization config."},
    ),
    OmniFlag(
        ("--model-class-name",),
        "model_class_name",
        {
            "type": str,
            "help": "[omni engine] The pipeline class to use instead of model_index.json's.",
        },
    ),
    OmniFlag(
        ("--diffusion-load-format",),
        "diffusion_load_format",
        {
            "type": str,
            "choices": ["default", "custom_pipeline", "dummy", "diffusers"],
            "help": "[omni engine] How vllm-omni loads the pipeline (diffusers: its adapter).",
        },
    ),
)


def omni_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The vllm-omni config fields the command line sets: `OMNI_FLAGS`, `--tensor-parallel-size`
    above 1 and `--distributed-executor-backend`."""
    options = {
        flag.config_field: getattr(args, flag.dest)
        for flag in OMNI_FLAGS
        if getattr(args, flag.dest, None) is not None
    }
    if getattr(args, "tensor_parallel_size", 1) > 1:
        options["tensor_parallel_size"] = args.tensor_parallel_size
    if getattr(args, "distributed_executor_backend", None) is not None:
        options["distributed_executor_backend"] = args.distributed_executor_backend
    return options


def _is_serve_command(argv: Sequence[str]) -> bool:
    return len(argv) > 1 and argv[1] == "serve"


def asks_for_image_task(argv: Sequence[str]) -> bool:
    """Whether a command line (before parsing) is `vllm serve ... --task image`."""
    if not _is_serve_command(argv):
        return False
    for index, arg in enumerate(argv):
        if arg == f"--task={IMAGE_TASK}":
            return True
        if arg == "--task" and index + 1 < len(argv) and argv[index + 1] == IMAGE_TASK:
            return True
    return False


def asks_for_serve_help(argv: Sequence[str]) -> bool:
    """Whether the command line is `vllm serve ... --help` (help starts no engine)."""
    return _is_serve_command(argv) and any(
        arg == "-h" or arg == "--help" or arg.startswith("--help=") for arg in argv[2:]
    )
