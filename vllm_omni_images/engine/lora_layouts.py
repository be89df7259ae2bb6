"""LoRA adapters in the layouts they ship in, mapped to diffusers' own by diffusers' own
conversion for the served pipeline (`<Pipeline>.lora_state_dict`): for Qwen-Image that maps
Kohya and musubi-tuner files (`lora_unet_...lora_down/lora_up` with `alpha`), ComfyUI's
(`diffusion_model.`) and PEFT's module names (`default.`); ai-toolkit's and diffusers' own
(`transformer.<module>.lora_A/lora_B`) need no mapping; FLUX's converter also reads xlabs and
BFL files and returns alpha tensors, which scale as diffusers scales them. The result is one
form: each layer of the transformer (`LoRAPair`) with its scaling.

What diffusers cannot serve as a plain LoRA of the transformer is told from the tensors' names
alone (`unservable_kind`): LyCORIS' LoKr, LoHa, OFT; DoRA (whose magnitudes diffusers drops
with a warning); a text encoder's weights. Everything here works on tensors of the meta device
too, so that a file's layout is known from its safetensors header before its weights are read.
Reasons given never quote the files: they are for clients."""

from __future__ import annotations

import collections
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vllm_omni_images.engine.errors import LoRAAdapterError
from vllm_omni_images.engine.safetensors_header import SafetensorsHeader

TRANSFORMER_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
"""PEFT's `save_pretrained` names, `base_model.model.<module>...` (read as `transformer.`)."""

_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}
_DOWN_SEGMENTS = frozenset({"lora_A", "lora_down", "down"})
_UP_SEGMENTS = frozenset({"lora_B", "lora_up", "up"})
_ADAPTER_MARKERS = ("lora", "lokr_", "hada_", "oft_", "dora_")
"""What some tensor name of any adapter file holds; a file with none is no adapter."""
_KIND_MARKERS = (
    ("lokr_", "LoKr (LyCORIS)"),
    ("hada_", "LoHa (LyCORIS)"),
    ("oft_", "OFT"),
    ("boft_", "BOFT"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
)
"""Name segments (between dots) that start so, and the kind of adapter they belong to."""
_PEFT_TYPES = {"LOKR": "LoKr", "LOHA": "LoHa", "OFT": "OFT", "BOFT": "BOFT", "IA3": "IA3"}
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")
"""Kohya's (`lora_te_`, `lora_te1_`...) and diffusers' (`text_encoder.`, `text_encoder_2.`,
ComfyUI's `text_encoders.`) names of a text encoder's LoRA weights."""
_BAD_CONFIG = "its LoRA configuration (lora_alpha, alpha_pattern, use_rslora) is not valid"

_TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
"""safetensors' dtypes (`safetensors_header.DTYPE_BYTES`) as torch's."""


@dataclass(frozen=True)
class LoRAPair:
    """One layer's matrices in the converted state dict: A (rank, in), B (out, rank)."""

    down_key: str
    up_key: str
    rank: int
    in_features: int
    out_features: int
    scale: float
    """What B is multiplied by: PEFT's alpha / rank (alpha / sqrt(rank) with rsLoRA)."""


def looks_like_an_adapter(names: Iterable[str]) -> bool:
    """Whether some tensor name is one of an adapter's, in any layout: model weights are not."""
    return any(marker in name.lower() for name in names for marker in _ADAPTER_MARKERS)


def unservable_kind(names: Iterable[str], config: Mapping[str, Any]) -> str | None:
    """Why an adapter of these tensor names and PEFT config is not a plain LoRA of the
    transformer that diffusers serves, or `None`. Quotes neither names nor config."""
    peft_type = config.get("peft_type", "LORA")
    if config.get("use_dora"):
        return _kind_reason("DoRA")
    if peft_type != "LORA":
        if isinstance(peft_type, str) and peft_type in _PEFT_TYPES:
            return _kind_reason(_PEFT_TYPES[peft_type])
        return "it is not a plain LoRA adapter (PEFT type LORA); only those are served"
    for name in names:
        if name.startswith(_TEXT_ENCODER_PREFIXES):
            return (
                "it holds LoRA weights of a text encoder, which would change the encoding of "
                "every prompt in a batch; only adapters of the transformer are served"
            )
        for segment in name.split("."):
            for marker, kind in _KIND_MARKERS:
                if segment.startswith(marker):
                    return _kind_reason(kind)
    return None


def rank_dimension(name: str, shape: tuple[int, ...]) -> int | None:
    """The rank a LoRA matrix of this name and shape declares (a down matrix's first
    dimension, an up matrix's second), in any layout; `None` for other tensors."""
    if len(shape) < 2:
        return None
    segments = set(name.split("."))
    if segments & _DOWN_SEGMENTS:
        return shape[0]
    if segments & _UP_SEGMENTS:
        return shape[1]
    return None


def stand_in_state(header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """The file's tensors as its header declares them, on the meta device (no memory, no
    values) but for scalars (alphas), which converters read: those are 1.0, on the CPU. A
    converter run on them learns the layout; scales computed from them mean nothing."""
    state = {}
    for key, entry in header.tensors.items():
        dtype = _TORCH_DTYPES[entry.dtype]
        if math.prod(entry.shape) <= 1:
            state[key] = torch.ones(entry.shape, dtype=dtype)
        else:
            state[key] = torch.empty(entry.shape, dtype=dtype, device="meta")
    return state


def peft_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT folder's tensors in diffusers' names (`base_model.model.` -> `transformer.`), for
    the pipeline's converter (FLUX's takes `base_model` for fal's Kontext layout)."""
    return {
        TRANSFORMER_PREFIX + key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key: value
        for key, value in state.items()
    }


def convert(
    state: Mapping[str, torch.Tensor], pipeline: type | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`state` in diffusers' names (`transformer.<module>.lora_A.weight`...) and the alpha
    tensors diffusers scales it by, as `pipeline.lora_state_dict` gives them (Kohya alphas it
    folds into the weights itself); `state` as it is for a pipeline without one. Raises
    whatever the converter raises (the message may quote the file)."""
    read = getattr(pipeline, "lora_state_dict", None)
    if read is None:
        return dict(state), {}
    options: dict[str, Any] = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(read).parameters:
        options["return_alphas"] = True
    outputs = read(dict(state), **options)  # a copy: converters pop from what they get
    converted, alphas = outputs[0], (outputs[1] if len(outputs) == 3 else None)
    return dict(converted), dict(alphas or {})


def lora_pairs(
    state: Mapping[str, torch.Tensor],
    alphas: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    name: str,
) -> dict[str, LoRAPair] | None:
    """Each transformer layer of a converted state dict with its matrices' shapes and its
    scaling: alphas per layer as diffusers applies them (the most common alpha for layers
    without one), else the config's (diffusers' metadata or PEFT's), else alpha = rank.
    `None` when no tensor is a transformer LoRA weight; `LoRAAdapterError` for leftovers and
    matrices that are not one LoRA layer."""
    halves: dict[str, list[str | None]] = {}
    others = 0
    for key in state:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(TRANSFORMER_PREFIX):
            others += 1
            continue
        module = key[len(TRANSFORMER_PREFIX) : -len(suffix)]
        halves.setdefault(module, [None, None])[_SUFFIXES[suffix]] = key
    if not halves:
        return None
    if others:
        raise LoRAAdapterError(
            name,
            f"it holds {others} tensor(s) besides LoRA weights of the transformer (biases, "
            "norms, another format's); only plain transformer LoRA adapters are served",
        )
    if alphas and config:
        raise LoRAAdapterError(name, "both alpha tensors and a LoRA configuration scale it")
    by_module = _alphas_by_module(alphas, name)
    common = collections.Counter(by_module.values()).most_common(1)
    pairs: dict[str, LoRAPair] = {}
    for module, (down_key, up_key) in halves.items():
        if down_key is None or up_key is None:
            raise LoRAAdapterError(
                name, f"one of its {len(halves)} layers lacks its lora_A or lora_B matrix"
            )
        down, up = state[down_key], state[up_key]
        if not (down.is_floating_point() and up.is_floating_point()):
            raise LoRAAdapterError(name, "its LoRA weights are not floating-point numbers")
        if down.dim() != 2 or up.dim() != 2 or not down.shape[0] == up.shape[1] > 0:
            raise LoRAAdapterError(
                name,
                f"one of its {len(halves)} layers has no lora_A (rank, in) and lora_B (out, rank) "
                "matrices of one rank",
            )
        rank = down.shape[0]
        if by_module:
            scale = by_module.get(module, common[0][0]) / rank
        else:
            scale = _config_scaling(config, module, rank, name)
        pairs[module] = LoRAPair(down_key, up_key, rank, down.shape[1], up.shape[0], scale)
    return pairs


def _alphas_by_module(alphas: Mapping[str, torch.Tensor], name: str) -> dict[str, float]:
    """`transformer.<module>.alpha` tensors by module (others are not the transformer's)."""
    by_module = {}
    for key, value in alphas.items():
        if not (key.startswith(TRANSFORMER_PREFIX) and key.endswith(".alpha")):
            continue
        alpha = float(value) if torch.as_tensor(value).numel() == 1 else math.nan
        if not math.isfinite(alpha):
            raise LoRAAdapterError(name, "its alpha tensors are not numbers")
        by_module[key[len(TRANSFORMER_PREFIX) : -len(".alpha")]] = alpha
    return by_module


def _config_scaling(config: Mapping[str, Any], module: str, rank: int, name: str) -> float:
    """PEFT's: alpha / rank (alpha / sqrt(rank) with rsLoRA), alpha per `alpha_pattern`."""
    alpha = config.get("lora_alpha") or rank
    pattern = config.get("alpha_pattern") or {}
    rslora = config.get("use_rslora") or False
    if not isinstance(pattern, dict) or not isinstance(rslora, bool):
        raise LoRAAdapterError(name, _BAD_CONFIG)
    for layers, value in pattern.items():
        if module == layers or module.endswith(f".{layers}"):
            alpha = value
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoRAAdapterError(name, _BAD_CONFIG)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _kind_reason(kind: str) -> str:
    return f"it is a {kind} adapter; only plain LoRA adapters are served"
