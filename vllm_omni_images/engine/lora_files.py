"""LoRA adapter files: diffusers' and PEFT's formats read into one form (`AdapterWeights`),
checked against the served model from their headers before any weight is read, and written in
the form each engine loads. Refusals (`LoRAAdapterError`) name the adapter and a reason; they
never quote the files (their tensor names, metadata or parse errors) and tell a missing path
from an unreadable or foreign one only in the server's log."""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_omni_images.engine.base import LoRAAdapter
from vllm_omni_images.engine.errors import LoRAAdapterError
from vllm_omni_images.engine.safetensors_header import (
    FLOAT_DTYPES,
    SafetensorsHeader,
    read_header,
)

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""The metadata key of diffusers' PEFT configs (JSON, keys `transformer.<field>`)."""

MAX_CONFIG_BYTES = 2**20
"""A PEFT `adapter_config.json` above this is refused (PEFT's own are a few kB)."""
NOT_AN_ADAPTER = (
    "its lora_path holds no LoRA adapter this server can read (diffusers' "
    f"{DIFFUSERS_WEIGHTS}, that .safetensors file alone, or a PEFT folder with {PEFT_CONFIG} "
    f"and {PEFT_WEIGHTS}, readable by the server)"
)
"""The reason given alike for a path with nothing there, one the server may not read, and one
that holds no adapter: a client learns nothing about other files from it."""
_BAD_CONFIG = "its LoRA configuration (lora_alpha, alpha_pattern, use_rslora) is not valid"

_TRANSFORMER_PREFIX = "transformer."
_PEFT_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}


@dataclass(frozen=True)
class AdapterWeights:
    """One transformer adapter: `modules[name] = (A, B)`, A (rank, in), B (out, rank), with the
    scaling (alpha / rank) folded into B, so strength 1.0 is the adapter as trained."""

    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int


@dataclass(frozen=True)
class LoRAPair:
    """One layer's matrices as the header declares them: A (rank, in), B (out, rank)."""

    down_key: str
    up_key: str
    rank: int
    in_features: int
    out_features: int
    scale: float
    """What B is multiplied by: PEFT's alpha / rank (alpha / sqrt(rank) with rsLoRA)."""


@dataclass(frozen=True)
class AdapterLayout:
    """An adapter as its files declare it (the safetensors header, the LoRA config), read
    without its weights: enough to check its rank and the layers it changes."""

    path: str
    """The adapter's `lora_path`, for the server's log."""
    weights_file: Path
    modules: Mapping[str, LoRAPair]

    @property
    def rank(self) -> int:
        return max(pair.rank for pair in self.modules.values())


def read_checked(
    adapter: LoRAAdapter, max_rank: int, transformer: torch.nn.Module | None
) -> AdapterWeights:
    """`adapter`'s weights, read only once its headers show that it can be served (its rank at
    most `max_rank`, each layer one of `transformer`'s); else `LoRAAdapterError`."""
    layout = inspect_adapter(adapter.path, adapter.name)
    check_rank(layout, max_rank, adapter.name)
    check_fits(layout, transformer, adapter.name)
    return read_weights(layout, adapter.name)


def inspect_adapter(path: str, name: str) -> AdapterLayout:
    """The adapter at `path` (either format) from its config and safetensors header alone, or
    `LoRAAdapterError`. Whatever is not an adapter this module reads (nothing there, no access,
    not safetensors, no LoRA weights) gets one and the same message (`NOT_AN_ADAPTER`), so that
    the answer tells nothing about other files; the details go to the server's log."""
    try:
        weights_file, header, config, prefix = _read_headers(Path(path).expanduser())
    except (OSError, ValueError, RecursionError) as error:  # also JSON nested too deep
        raise _not_an_adapter(name, path, str(error)) from None
    if config.get("use_dora"):
        raise LoRAAdapterError(name, "it is a DoRA adapter; only plain LoRA is served")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAAdapterError(
            name, "it is not a plain LoRA adapter (PEFT type LORA); only those are served"
        )
    halves: dict[str, list[str | None]] = {}
    others = 0
    for key in header.tensors:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(prefix):
            others += 1
            continue
        halves.setdefault(key[len(prefix) : -len(suffix)], [None, None])[_SUFFIXES[suffix]] = key
    if not halves:
        raise _not_an_adapter(name, path, f"no tensor is a LoRA weight under {prefix!r}")
    if others:
        raise LoRAAdapterError(
            name,
            f"it holds {others} tensor(s) besides LoRA weights of the transformer (a text "
            "encoder's, or another format's); only transformer LoRA adapters are served",
        )
    modules: dict[str, LoRAPair] = {}
    for module_name, (down_key, up_key) in halves.items():
        if down_key is None or up_key is None:
            raise LoRAAdapterError(
                name, f"one of its {len(halves)} layers lacks its lora_A or lora_B matrix"
            )
        down, up = header.tensors[down_key], header.tensors[up_key]
        if not {down.dtype, up.dtype} <= FLOAT_DTYPES:
            raise LoRAAdapterError(name, "its LoRA weights are not floating-point numbers")
        if len(down.shape) != 2 or len(up.shape) != 2 or not down.shape[0] == up.shape[1] > 0:
            raise LoRAAdapterError(
                name,
                f"one of its {len(halves)} layers has no lora_A (rank, in) and lora_B (out, rank) "
                "matrices of one rank",
            )
        rank = down.shape[0]
        scale = _scaling(config, module_name, rank, name)
        modules[module_name] = LoRAPair(down_key, up_key, rank, down.shape[1], up.shape[0], scale)
    return AdapterLayout(path, weights_file, modules)


def check_rank(layout: AdapterLayout, max_rank: int, name: str) -> None:
    if layout.rank > max_rank:
        raise LoRAAdapterError(name, f"its rank {layout.rank} is above --max-lora-rank {max_rank}")


def check_fits(layout: AdapterLayout, transformer: torch.nn.Module | None, name: str) -> None:
    """Raise `LoRAAdapterError` unless every layer the adapter changes is a linear layer of
    `transformer` (its structure only: it may be on the meta device) of the adapter's shapes.
    Only the model's own layer names are quoted, never a name the file alone holds."""
    if transformer is None:
        raise LoRAAdapterError(
            name, "the served model has no transformer (only its adapters are served)"
        )
    model = type(transformer).__name__
    missing = 0
    for module_name, pair in layout.modules.items():
        try:
            layer = transformer.get_submodule(module_name)
        except AttributeError:
            missing += 1
            continue
        # A layer that already carries adapters is PEFT's wrapper around the original one.
        while isinstance(inner := getattr(layer, "base_layer", None), torch.nn.Module):
            layer = inner
        if not isinstance(layer, torch.nn.Linear):
            raise LoRAAdapterError(name, f"{module_name} of {model} is not a linear layer")
        if pair.in_features != layer.in_features or pair.out_features != layer.out_features:
            raise LoRAAdapterError(
                name,
                f"it was made for another model: its {module_name} maps {pair.in_features} to "
                f"{pair.out_features} features, {model}'s maps {layer.in_features} to "
                f"{layer.out_features}",
            )
    if missing:
        raise LoRAAdapterError(
            name,
            f"it was made for another model: {missing} of its {len(layout.modules)} layers "
            f"are not layers of {model}",
        )


def read_weights(layout: AdapterLayout, name: str) -> AdapterWeights:
    """The weights `layout` declares, scaled (`AdapterWeights`); `LoRAAdapterError` if the
    file cannot be read or no longer matches its header."""
    from safetensors import safe_open

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with safe_open(str(layout.weights_file), framework="pt") as handle:
            for module_name, pair in layout.modules.items():
                down, up = handle.get_tensor(pair.down_key), handle.get_tensor(pair.up_key)
                declared = ((pair.rank, pair.in_features), (pair.out_features, pair.rank))
                if (down.shape, up.shape) != declared:
                    raise ValueError("a tensor's shape changed since its header was read")
                modules[module_name] = (down.float(), up.float() * pair.scale)
    except Exception as error:  # safetensors' own error types vary by version
        raise _not_an_adapter(name, layout.path, f"its weights cannot be read: {error}") from None
    return AdapterWeights(modules, layout.rank)


@functools.cache
def meta_transformer(model_path: str) -> torch.nn.Module | None:
    """The folder's transformer built on the meta device from its config, once per folder;
    `None` when it has no diffusers transformer."""
    import diffusers

    try:
        config = json.loads((Path(model_path) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model_class = getattr(diffusers, str(config.get("_class_name")), None)
    if model_class is None:
        return None
    with torch.device("meta"):
        return model_class.from_config(config)


def diffusers_state_dict(weights: AdapterWeights) -> dict[str, torch.Tensor]:
    """What diffusers' `load_lora_weights` takes (rank = alpha: the scaling is in B)."""
    state: dict[str, torch.Tensor] = {}
    for module_name, (down, up) in weights.modules.items():
        state[f"{_TRANSFORMER_PREFIX}{module_name}.lora_A.weight"] = down
        state[f"{_TRANSFORMER_PREFIX}{module_name}.lora_B.weight"] = up
    return state


VLLM_OMNI_MODULE_RENAMES = ((".to_out.0", ".to_out"),)
"""diffusers' module names to vllm-omni's (diffusers' `to_out` is a list: layer, dropout)."""


def write_peft_folder(weights: AdapterWeights, folder: Path) -> None:
    """Write the adapter as the PEFT folder vllm-omni's LoRA manager loads, in its names."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for module_name, (down, up) in weights.modules.items():
        target = module_name
        for old, new in VLLM_OMNI_MODULE_RENAMES:
            if target.endswith(old):
                target = target[: -len(old)] + new
        targets.add(target.rsplit(".", 1)[-1])
        tensors[f"{_PEFT_PREFIX}{target}.lora_A.weight"] = down.contiguous()
        tensors[f"{_PEFT_PREFIX}{target}.lora_B.weight"] = up.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS))
    config = {
        "peft_type": "LORA",
        "r": weights.rank,
        "lora_alpha": weights.rank,  # the scaling is folded into B
        "target_modules": sorted(targets),
        "bias": "none",
    }
    (folder / PEFT_CONFIG).write_text(json.dumps(config))


class PeftCopies:
    """PEFT copies for vllm-omni of the adapters of the model at `model_path`, in a temporary
    folder until `remove`; `write` may run in several threads at once."""

    def __init__(self, model_path: str, max_rank: int) -> None:
        self._model_path = model_path
        self._max_rank = max_rank
        self._folder: Path | None = None
        self._lock = threading.Lock()

    def write(self, adapter: LoRAAdapter) -> Path:
        """Check `adapter` against the model's `meta_transformer` and write a new copy; raise
        `LoRAAdapterError` if it cannot be served."""
        weights = read_checked(adapter, self._max_rank, meta_transformer(self._model_path))
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="vllm-omni-images-lora-"))
        # A new folder per load: vllm-omni may re-read an evicted adapter from its path.
        folder = self._folder / f"{adapter.adapter_id}-{uuid.uuid4().hex[:8]}"
        write_peft_folder(weights, folder)
        return folder

    def remove(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def _read_headers(
    location: Path,
) -> tuple[Path, SafetensorsHeader, Mapping[str, Any], str]:
    """The weights file, its header, the LoRA config and the tensors' name prefix, from PEFT's
    folder or diffusers' (or its one file). Raises `OSError` or `ValueError`."""
    if location.is_dir() and (location / PEFT_CONFIG).is_file():
        config_file = location / PEFT_CONFIG
        if config_file.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{PEFT_CONFIG} is over {MAX_CONFIG_BYTES} bytes")
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{PEFT_CONFIG} is not a JSON object")
        weights_file = location / PEFT_WEIGHTS
        return weights_file, read_header(weights_file), config, _PEFT_PREFIX
    weights_file = location / DIFFUSERS_WEIGHTS if location.is_dir() else location
    header = read_header(weights_file)
    fields = json.loads(header.metadata.get(DIFFUSERS_METADATA_KEY, "{}"))
    if not isinstance(fields, dict):
        raise ValueError(f"{DIFFUSERS_METADATA_KEY} is not a JSON object")
    config = {
        key[len(_TRANSFORMER_PREFIX) :]: value
        for key, value in fields.items()
        if key.startswith(_TRANSFORMER_PREFIX)
    }
    return weights_file, header, config, _TRANSFORMER_PREFIX


def _scaling(config: Mapping[str, Any], module_name: str, rank: int, name: str) -> float:
    """PEFT's: alpha / rank (alpha / sqrt(rank) with rsLoRA), alpha per `alpha_pattern`."""
    alpha = config.get("lora_alpha") or rank
    pattern = config.get("alpha_pattern") or {}
    rslora = config.get("use_rslora") or False
    if not isinstance(pattern, dict) or not isinstance(rslora, bool):
        raise LoRAAdapterError(name, _BAD_CONFIG)
    for layers, value in pattern.items():
        if module_name == layers or module_name.endswith(f".{layers}"):
            alpha = value
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoRAAdapterError(name, _BAD_CONFIG)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _not_an_adapter(name: str, path: str, detail: str) -> LoRAAdapterError:
    """The one answer for a `lora_path` that holds no adapter this module reads; `detail` (which
    may quote the file) goes to the server's log only."""
    logger.warning("LoRA adapter %r: %r is not a readable adapter: %.300s", name, path, detail)
    return LoRAAdapterError(name, NOT_AN_ADAPTER)
