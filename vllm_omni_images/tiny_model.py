"""The embedded default model, `tiny-qwen-image`: `Qwen/Qwen-Image`'s classes with a handful of
channels and two layers and random weights, built once, deterministically and offline, into a
cache folder, then loaded like any other model. Importable without vLLM."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_omni_images.engine.base import DEFAULTS_FILE

TINY_MODEL_NAME = "tiny-qwen-image"
CACHE_ENV_VAR = "VLLM_OMNI_IMAGES_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/vllm-omni-images")

# Bump when the built model changes, so stale caches are rebuilt instead of reused.
TINY_MODEL_VERSION = 2
MARKER_FILE = "tiny_model_version.json"

# The serving defaults the pipeline does not record itself (see `engine.base.DEFAULTS_FILE`).
TINY_MODEL_DEFAULTS = {"width": 256, "height": 256, "num_inference_steps": 4}
TINY_MODEL_BYTES_PER_MEGAPIXEL = 553_000_000
"""The tiny Qwen-Image's peak memory per megapixel of a call on the CPU (float32), as
`benchmarks/memory_admission.py` measured it (docs/benchmarks/memory_admission.md); its
default pixel budget follows from it."""

_SEED = 0
# Qwen-Image's scheduler settings (scheduler/scheduler_config.json of Qwen/Qwen-Image).
_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def cache_dir() -> Path:
    """Where built models live: `$VLLM_OMNI_IMAGES_CACHE`, else `~/.cache/vllm-omni-images`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def tiny_model_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{TINY_MODEL_NAME}-v{TINY_MODEL_VERSION}"


def is_built(path: Path, version: int = TINY_MODEL_VERSION) -> bool:
    marker = path / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == version
    except (OSError, ValueError):
        return False


def ensure_tiny_model(root: Path | None = None) -> Path:
    """The tiny model's folder, built first if not in the cache."""
    return ensure_built(tiny_model_path(root), TINY_MODEL_VERSION, build_tiny_model)


def ensure_built(path: Path, version: int, build: Callable[[Path], None]) -> Path:
    """`path`, built by `build` (which writes the `MARKER_FILE` of `version`) unless it is;
    a crash or a concurrent build never leaves a half-written model there (it is built aside
    and renamed into place)."""
    if is_built(path, version):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(staging)
        try:
            staging.rename(path)
        except OSError:
            # Another process finished first, or a stale folder is in the way.
            if not is_built(path, version):
                shutil.rmtree(path, ignore_errors=True)
                staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def resolve_model_path(model: str) -> str:
    """Map the embedded model's name to its built folder; any other name is returned as is."""
    if model == TINY_MODEL_NAME:
        return str(ensure_tiny_model())
    return model


@dataclass(frozen=True)
class QwenImageShape:
    """The sizes of a Qwen-Image pipeline; the classes and wiring are always the real ones."""

    layers: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]  # sums to head_dim
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    mrope_section: tuple[int, int, int]  # sums to text head_dim / 2
    vae_base_dim: int
    vae_res_blocks: int
    weight_gain: float = 1.0
    """Multiplies the transformer's linear weights after PyTorch's default init."""


TINY_SHAPE = QwenImageShape(
    layers=2,
    heads=2,
    head_dim=8,
    axes_dims_rope=(2, 2, 4),
    text_hidden=16,
    text_layers=2,
    text_heads=2,
    text_kv_heads=1,
    text_intermediate=32,
    mrope_section=(1, 1, 2),  # Qwen2.5-VL's split of head_dim 128 is (16, 24, 24)
    vae_base_dim=8,
    vae_res_blocks=1,
    # PyTorch's default init leaves a 2-layer model nearly blind to its text input; a wider
    # spread makes the prompt (and the negative prompt) visibly change the image.
    weight_gain=3.0,
)


def wide_shape(layers: int = 4, text_layers: int = 2) -> QwenImageShape:
    """Qwen/Qwen-Image's real widths (a 3072-wide transformer, the 7B text encoder's 3584-wide
    layers, the full VAE) with fewer layers: loads a GPU like the real model, per layer."""
    return QwenImageShape(
        layers=layers,
        heads=24,
        head_dim=128,
        axes_dims_rope=(16, 56, 56),
        text_hidden=3584,
        text_layers=text_layers,
        text_heads=28,
        text_kv_heads=4,
        text_intermediate=18944,
        mrope_section=(16, 24, 24),
        vae_base_dim=96,
        vae_res_blocks=2,
    )


def build_tiny_model(path: Path) -> None:
    """Build the tiny pipeline into `path` (deterministic: same weights on every machine)."""
    pipeline = build_qwen_image_pipeline(TINY_SHAPE)
    pipeline.save_pretrained(path, safe_serialization=True)
    defaults = {**TINY_MODEL_DEFAULTS, "bytes_per_megapixel": TINY_MODEL_BYTES_PER_MEGAPIXEL}
    (path / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
    (path / MARKER_FILE).write_text(json.dumps({"version": TINY_MODEL_VERSION}) + "\n")


def build_qwen_image_pipeline(shape: QwenImageShape, device: str | None = None) -> Any:
    """A random-weight `QwenImagePipeline` of `shape`, the same on every build; `device`
    builds the weights there directly."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(_SEED)
        transformer: Any = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 latent channels packed into 2x2 patches
            out_channels=16,
            num_layers=shape.layers,
            attention_head_dim=shape.head_dim,
            num_attention_heads=shape.heads,
            joint_attention_dim=shape.text_hidden,
            axes_dims_rope=shape.axes_dims_rope,
        )
        if shape.weight_gain != 1.0:
            with torch.no_grad():
                for module in transformer.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.mul_(shape.weight_gain)
        torch.manual_seed(_SEED)
        vae = AutoencoderKLQwenImage(
            base_dim=shape.vae_base_dim,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=shape.vae_res_blocks,
            temperal_downsample=[False, True, True],
        )
        tokenizer = _build_tokenizer()
        torch.manual_seed(_SEED)
        text_encoder = _build_text_encoder(shape, vocab_size=len(tokenizer))
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


# The words of QwenImagePipeline's prompt template. Merging each into one token makes the
# template's system part exactly 34 tokens, as with Qwen's real tokenizer, so the pipeline's
# `prompt_template_encode_start_idx = 34` drops it and only the user's prompt conditions the image.
_TEMPLATE_TEXTS = (
    "system",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:",
    "user",
    "assistant",
)


def _build_tokenizer(  # type: ignore[no-untyped-def]  # transformers' class is untyped
    template_texts: tuple[str, ...] = _TEMPLATE_TEXTS,
):
    """A byte-level BPE tokenizer with Qwen2's special tokens: every byte is a token, plus
    merges for the words of `template_texts`, so nothing has to be trained or downloaded."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    merges: list[tuple[str, str]] = []
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in template_texts:
        for word, _ in splitter.pre_tokenize_str(text):
            for end in range(1, len(word)):
                if word[: end + 1] not in vocab:
                    merges.append((word[:end], word[end]))
                    vocab[word[: end + 1]] = len(vocab)
    # tokenizers' BPE takes merges as pairs; transformers' annotation only names strings.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]
    tokenizer.add_tokens(
        [AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)]
    )
    return tokenizer


def _build_text_encoder(shape: QwenImageShape, vocab_size: int):  # type: ignore[no-untyped-def]
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Four ids after the tokenizer's own for the vision markers, so that text-only prompts
    # never look like image input.
    text_tokens = vocab_size
    vocab_size = text_tokens + 4
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": shape.text_hidden,
            "intermediate_size": shape.text_intermediate,
            "num_hidden_layers": shape.text_layers,
            "num_attention_heads": shape.text_heads,
            "num_key_value_heads": shape.text_kv_heads,
            "max_position_embeddings": 4096,
            "bos_token_id": None,
            "eos_token_id": None,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": list(shape.mrope_section),
            },
        },
        # Qwen-Image never passes images to its text encoder; a minimal vision tower suffices.
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": shape.text_hidden,
            "fullatt_block_indexes": [0],
        },
        image_token_id=text_tokens,
        video_token_id=text_tokens + 1,
        vision_start_token_id=text_tokens + 2,
        vision_end_token_id=text_tokens + 3,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()
