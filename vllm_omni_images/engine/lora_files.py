"""LoRA adapter files in every layout diffusers reads for the served pipeline (Kohya, ComfyUI,
ai-toolkit, musubi-tuner, diffusers' own, PEFT's: `lora_layouts`), read into one form
(`AdapterWeights`), checked against the served model from their safetensors headers before any
weight is read, and written in the form each engine loads. Refusals (`LoRAAdapterError`) name
the adapter and a reason; they never quote the files (their tensor names, metadata or parse
errors) and tell a missing path from an unreadable or foreign one only in the server's log."""

from __future__ import annotations

import functools
import json
import logging
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
from vllm_omni_images.engine.lora_layouts import (
    PEFT_PREFIX,
    TRANSFORMER_PREFIX,
    LoRAPair,
    convert,
    looks_like_an_adapter,
    lora_pairs,
    peft_names,
    rank_dimension,
    stand_in_state,
    unservable_kind,
)
from vllm_omni_images.engine.safetensors_header import SafetensorsHeader, read_header

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""The metadata key of diffusers' PEFT configs (JSON, keys `transformer.<field>`)."""

MAX_CONFIG_BYTES = 2**20
"""A PEFT `adapter_config.json` above this is refused (PEFT's own are a few kB)."""
SIZE_SLACK = 2**20
"""Bytes an adapter file may hold beyond its LoRA matrices (header, alphas)."""
NOT_AN_ADAPTER = (
    "its lora_path holds no LoRA adapter this server can read (a .safetensors file of LoRA "
    f"weights in a layout diffusers reads, a folder with {DIFFUSERS_WEIGHTS}, or a PEFT folder "
    f"with {PEFT_CONFIG} and {PEFT_WEIGHTS}, readable by the server)"
)
"""The reason given alike for a path with nothing there, one the server may not read, and one
that holds no adapter: a client learns nothing about other files from it."""


@dataclass(frozen=True)
class AdapterWeights:
    """One transformer adapter: `modules[name] = (A, B)`, A (rank, in), B (out, rank), with the
    scaling (alpha / rank) folded into B, so strength 1.0 is the adapter as trained."""

    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int


@dataclass(frozen=True)
class AdapterSource:
    """An adapter's files as they declare it, read without its weights: the safetensors
    header and the LoRA config (PEFT's `adapter_config.json`, or diffusers' metadata)."""

    path: str
    """The adapter's `lora_path`, for the server's log."""
    weights_file: Path
    header: SafetensorsHeader
    config: Mapping[str, Any]
    size: int
    """The weights file's length in bytes."""
    peft: bool
    """A PEFT folder: its tensors are named `base_model.model.<module>...`."""


@dataclass(frozen=True)
class AdapterLayout:
    """An adapter in diffusers' names, as the pipeline's converter gave it: each transformer
    layer (`pairs`) and the converted tensors, on the meta device when read from the header
    alone (`declared_layout`)."""

    pairs: Mapping[str, LoRAPair]
    tensors: Mapping[str, torch.Tensor]

    @property
    def rank(self) -> int:
        return max(pair.rank for pair in self.pairs.values())

    def weights(self) -> AdapterWeights:
        """The matrices in float32, each layer's scaling folded into B."""
        modules = {
            module: (
                self.tensors[pair.down_key].float(),
                self.tensors[pair.up_key].float() * pair.scale,
            )
            for module, pair in self.pairs.items()
        }
        return AdapterWeights(modules, self.rank)


def read_checked(
    adapter: LoRAAdapter,
    max_rank: int,
    transformer: torch.nn.Module | None,
    pipeline: type | None,
) -> AdapterWeights:
    """`adapter`'s weights, in any layout the served pipeline's class `pipeline` reads
    (`lora_state_dict`; `None`: diffusers' and PEFT's own only), read only once its header
    shows that it can be served: a plain LoRA of the transformer (`check_bounds`: of rank at
    most `max_rank`, no larger than such an adapter of `transformer`; `declared_layout`: each
    layer one of `transformer`'s where the converter maps names alone), and checked again
    once converted. Else `LoRAAdapterError`."""
    transformer = _require_transformer(transformer, adapter.name)
    source = open_adapter(adapter.path, adapter.name)
    check_bounds(source, max_rank, transformer, adapter.name)
    declared = declared_layout(source, pipeline, adapter.name)
    if declared is not None:
        check_rank(declared, max_rank, adapter.name)
        check_fits(declared, transformer, adapter.name)
    layout = read_layout(source, pipeline, adapter.name)
    check_rank(layout, max_rank, adapter.name)
    check_fits(layout, transformer, adapter.name)
    return layout.weights()


def open_adapter(path: str, name: str) -> AdapterSource:
    """The adapter at `path` (a safetensors file, diffusers' folder or PEFT's) from its config
    and safetensors header alone, or `LoRAAdapterError`: what is no adapter (nothing there, no
    access, not safetensors, no adapter's tensor names) gets one and the same message
    (`NOT_AN_ADAPTER`), so that the answer tells nothing about other files, the details going
    to the server's log; an adapter diffusers cannot serve (LoKr, LoHa, DoRA, a text
    encoder's: `lora_layouts.unservable_kind`) is refused by its kind."""
    try:
        weights_file, header, config, peft = _read_headers(Path(path).expanduser())
        size = weights_file.stat().st_size
    except (OSError, ValueError, RecursionError) as error:  # also JSON nested too deep
        raise _not_an_adapter(name, path, str(error)) from None
    if not looks_like_an_adapter(header.tensors):
        raise _not_an_adapter(name, path, "no tensor is named as an adapter's are")
    reason = unservable_kind(header.tensors, config)
    if reason is not None:
        raise LoRAAdapterError(name, reason)
    return AdapterSource(path, weights_file, header, config, size, peft)


def check_bounds(
    source: AdapterSource, max_rank: int, transformer: torch.nn.Module, name: str
) -> None:
    """From the header alone, in any layout: no LoRA matrix of a rank above `max_rank`
    (`lora_layouts.rank_dimension`), and the file no larger than an adapter of that rank of
    every linear layer of `transformer` in float64, so that whatever the converter makes of
    it, the weights read are bounded."""
    ranks = (rank_dimension(key, entry.shape) for key, entry in source.header.tensors.items())
    rank = max((r for r in ranks if r is not None), default=0)
    if rank > max_rank:
        raise LoRAAdapterError(name, f"its rank {rank} is above --max-lora-rank {max_rank}")
    features = sum(
        layer.in_features + layer.out_features
        for module, layer in transformer.named_modules()
        if isinstance(layer, torch.nn.Linear) and ".lora_" not in module  # not loaded adapters
    )
    if source.size > max_rank * features * 8 + SIZE_SLACK:
        raise LoRAAdapterError(
            name,
            f"it is larger than any LoRA adapter of rank at most {max_rank} of "
            f"{type(transformer).__name__} can be",
        )


def declared_layout(
    source: AdapterSource, pipeline: type | None, name: str
) -> AdapterLayout | None:
    """The adapter's layout from its header alone: the converter run on stand-ins of its
    tensors (`lora_layouts.stand_in_state`); `None` where the converter needs the weights'
    values (FLUX's Kohya converter looks for zeros), or fails (`read_layout` tells why)."""
    try:
        state = stand_in_state(source.header)  # raises too for shapes torch has no tensor of
        converted, alphas = convert(peft_names(state) if source.peft else state, pipeline)
    except Exception as error:  # whatever the converter raises on stand-ins
        logger.debug("LoRA adapter %r: no layout from its header: %.300r", name, error)
        return None
    return _layout(source, converted, alphas, name)


def read_layout(source: AdapterSource, pipeline: type | None, name: str) -> AdapterLayout:
    """The adapter's weights, converted by `pipeline`'s `lora_state_dict`; `LoRAAdapterError`
    if the file cannot be read, no longer matches its header, or the converter refuses it."""
    state = _read_tensors(source, name)
    try:
        converted, alphas = convert(peft_names(state) if source.peft else state, pipeline)
    except Exception as error:  # converters raise KeyError, ValueError...
        logger.warning("LoRA adapter %r: diffusers cannot convert it: %.300r", name, error)
        reader = getattr(pipeline, "__name__", "the served pipeline")
        raise LoRAAdapterError(
            name, f"diffusers cannot read it as a LoRA adapter of {reader}"
        ) from None
    return _layout(source, converted, alphas, name)


def check_rank(layout: AdapterLayout, max_rank: int, name: str) -> None:
    if layout.rank > max_rank:
        raise LoRAAdapterError(name, f"its rank {layout.rank} is above --max-lora-rank {max_rank}")


def check_fits(layout: AdapterLayout, transformer: torch.nn.Module | None, name: str) -> None:
    """Raise `LoRAAdapterError` unless every layer the adapter changes is a linear layer of
    `transformer` (its structure only: it may be on the meta device) of the adapter's shapes.
    Only the model's own layer names are quoted, never a name the file alone holds."""
    transformer = _require_transformer(transformer, name)
    model = type(transformer).__name__
    missing = 0
    for module_name, pair in layout.pairs.items():
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
            f"it was made for another model: {missing} of its {len(layout.pairs)} layers "
            f"are not layers of {model}",
        )


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


@functools.cache
def served_pipeline(model_path: str) -> type | None:
    """The diffusers pipeline class the folder's `model_index.json` names, whose
    `lora_state_dict` reads adapters for it (as `type(pipe)` does for a loaded pipeline);
    `None` when diffusers has no class of that name."""
    import diffusers

    from vllm_omni_images.engine.model_folder import pipeline_class_name

    try:
        class_name = pipeline_class_name(model_path)
    except (OSError, ValueError):
        return None
    pipeline = getattr(diffusers, class_name, None) if class_name else None
    return pipeline if isinstance(pipeline, type) else None


def diffusers_state_dict(weights: AdapterWeights) -> dict[str, torch.Tensor]:
    """What diffusers' `load_lora_weights` takes (rank = alpha: the scaling is in B)."""
    state: dict[str, torch.Tensor] = {}
    for module_name, (down, up) in weights.modules.items():
        state[f"{TRANSFORMER_PREFIX}{module_name}.lora_A.weight"] = down
        state[f"{TRANSFORMER_PREFIX}{module_name}.lora_B.weight"] = up
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
        tensors[f"{PEFT_PREFIX}{target}.lora_A.weight"] = down.contiguous()
        tensors[f"{PEFT_PREFIX}{target}.lora_B.weight"] = up.contiguous()
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
        """Check `adapter` against the model's `meta_transformer`, read it as its pipeline's
        class reads it (`served_pipeline`), and write a new copy; raise
        `LoRAAdapterError` if it cannot be served."""
        weights = read_checked(
            adapter,
            self._max_rank,
            meta_transformer(self._model_path),
            served_pipeline(self._model_path),
        )
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
) -> tuple[Path, SafetensorsHeader, Mapping[str, Any], bool]:
    """The weights file, its header, the LoRA config and whether it is PEFT's folder (or else a
    safetensors file, alone or diffusers' folder's). Raises `OSError` or `ValueError`."""
    if location.is_dir() and (location / PEFT_CONFIG).is_file():
        config_file = location / PEFT_CONFIG
        if config_file.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{PEFT_CONFIG} is over {MAX_CONFIG_BYTES} bytes")
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{PEFT_CONFIG} is not a JSON object")
        weights_file = location / PEFT_WEIGHTS
        return weights_file, read_header(weights_file), config, True
    weights_file = location / DIFFUSERS_WEIGHTS if location.is_dir() else location
    header = read_header(weights_file)
    fields = json.loads(header.metadata.get(DIFFUSERS_METADATA_KEY, "{}"))
    if not isinstance(fields, dict):
        raise ValueError(f"{DIFFUSERS_METADATA_KEY} is not a JSON object")
    config = {
        key[len(TRANSFORMER_PREFIX) :]: value
        for key, value in fields.items()
        if key.startswith(TRANSFORMER_PREFIX)
    }
    return weights_file, header, config, False


def _read_tensors(source: AdapterSource, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of the weights file, as its header declared them."""
    from safetensors import safe_open

    state = {}
    try:
        with safe_open(str(source.weights_file), framework="pt") as handle:
            if set(handle.keys()) != set(source.header.tensors):
                raise ValueError("its tensors changed since its header was read")
            for key, entry in source.header.tensors.items():
                state[key] = handle.get_tensor(key)
                if tuple(state[key].shape) != entry.shape:
                    raise ValueError("a tensor's shape changed since its header was read")
    except Exception as error:  # safetensors' own error types vary by version
        raise _not_an_adapter(name, source.path, f"its weights cannot be read: {error}") from None
    return state


def _layout(
    source: AdapterSource,
    converted: Mapping[str, torch.Tensor],
    alphas: Mapping[str, torch.Tensor],
    name: str,
) -> AdapterLayout:
    pairs = lora_pairs(converted, alphas, source.config, name)
    if pairs is None:
        raise _not_an_adapter(name, source.path, "no tensor is a LoRA weight of a transformer")
    return AdapterLayout(pairs, converted)


def _require_transformer(transformer: torch.nn.Module | None, name: str) -> torch.nn.Module:
    if transformer is None:
        raise LoRAAdapterError(
            name, "the served model has no transformer (only its adapters are served)"
        )
    return transformer


def _not_an_adapter(name: str, path: str, detail: str) -> LoRAAdapterError:
    """The one answer for a `lora_path` that holds no adapter this module reads; `detail` (which
    may quote the file) goes to the server's log only."""
    logger.warning("LoRA adapter %r: %r is not a readable adapter: %.300s", name, path, detail)
    return LoRAAdapterError(name, NOT_AN_ADAPTER)
