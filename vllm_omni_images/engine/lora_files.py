"""LoRA adapter files: diffusers' and PEFT's formats read into one form (`AdapterWeights`),
checked against the served model, and written in the form each engine loads."""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_omni_images.engine.base import LoRAAdapter
from vllm_omni_images.engine.errors import LoRAAdapterError

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""The metadata key of diffusers' PEFT configs (JSON, keys `transformer.<field>`)."""

_TRANSFORMER_PREFIX = "transformer."
_PEFT_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}


@dataclass(frozen=True)
class AdapterWeights:
    """One transformer adapter: `modules[name] = (A, B)`, A (rank, in), B (out, rank), with the
    scaling (alpha / rank) folded into B, so strength 1.0 is the adapter as trained."""

    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    @property
    def target_modules(self) -> list[str]:
        """The last part of each module name, as PEFT's `target_modules` lists them."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})


def read_adapter(path: str, name: str) -> AdapterWeights:
    """The adapter at `path` (either format), or `LoRAAdapterError` saying why not."""
    location = Path(path).expanduser()
    if not location.exists():
        raise _error(name, path, "there is no file or folder there")
    if location.is_dir() and (location / PEFT_CONFIG).is_file():
        peft_config = _read_json(location / PEFT_CONFIG, name, path)
        tensors, _ = _read_safetensors(location / PEFT_WEIGHTS, name, path)
        return _to_weights(tensors, _PEFT_PREFIX, peft_config, name, path)
    weights_file = location / DIFFUSERS_WEIGHTS if location.is_dir() else location
    if not weights_file.is_file():
        raise _error(
            name,
            path,
            f"it holds neither {DIFFUSERS_WEIGHTS} (diffusers) nor {PEFT_CONFIG} (PEFT)",
        )
    tensors, metadata = _read_safetensors(weights_file, name, path)
    config: dict[str, Any] = {}
    if DIFFUSERS_METADATA_KEY in metadata:
        try:
            fields = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except ValueError:
            raise _error(name, path, "its LoRA metadata is not JSON") from None
        config = {
            key[len(_TRANSFORMER_PREFIX) :]: value
            for key, value in fields.items()
            if key.startswith(_TRANSFORMER_PREFIX)
        }
    return _to_weights(tensors, _TRANSFORMER_PREFIX, config, name, path)


def check_rank(weights: AdapterWeights, max_rank: int, name: str, path: str) -> None:
    if weights.rank > max_rank:
        raise _error(name, path, f"its rank {weights.rank} is above --max-lora-rank {max_rank}")


def check_fits(
    weights: AdapterWeights, transformer: torch.nn.Module | None, name: str, path: str
) -> None:
    """Raise `LoRAAdapterError` unless every module the adapter changes is a linear layer of
    `transformer` (its structure only: it may be on the meta device) of the adapter's shapes."""
    if transformer is None:
        raise _error(
            name, path, "the served model has no transformer (only its adapters are served)"
        )
    model = type(transformer).__name__
    for module_name, (down, up) in weights.modules.items():
        try:
            layer = transformer.get_submodule(module_name)
        except AttributeError:
            raise _error(
                name, path, f"it was made for another model: {model} has no layer {module_name}"
            ) from None
        # A layer that already carries adapters is PEFT's wrapper around the original one.
        while isinstance(inner := getattr(layer, "base_layer", None), torch.nn.Module):
            layer = inner
        if not isinstance(layer, torch.nn.Linear):
            raise _error(name, path, f"{module_name} of {model} is not a linear layer")
        if down.shape[1] != layer.in_features or up.shape[0] != layer.out_features:
            raise _error(
                name,
                path,
                f"it was made for another model: its {module_name} maps {down.shape[1]} to "
                f"{up.shape[0]} features, {model}'s maps {layer.in_features} to "
                f"{layer.out_features}",
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
    folder until `remove`."""

    def __init__(self, model_path: str, max_rank: int) -> None:
        self._model_path = model_path
        self._max_rank = max_rank
        self._folder: Path | None = None

    def write(self, adapter: LoRAAdapter) -> Path:
        """Check `adapter` against the model's `meta_transformer` and write a new copy; raise
        `LoRAAdapterError` if it cannot be served."""
        weights = read_adapter(adapter.path, adapter.name)
        check_rank(weights, self._max_rank, adapter.name, adapter.path)
        check_fits(weights, meta_transformer(self._model_path), adapter.name, adapter.path)
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="vllm-omni-images-lora-"))
        # A new folder per load: vllm-omni may re-read an evicted adapter from its path.
        folder = self._folder / f"{adapter.adapter_id}-{uuid.uuid4().hex[:8]}"
        write_peft_folder(weights, folder)
        return folder

    def remove(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def _to_weights(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    config: Mapping[str, Any],
    name: str,
    path: str,
) -> AdapterWeights:
    if config.get("use_dora"):
        raise _error(name, path, "it is a DoRA adapter; only plain LoRA is served")
    pairs: dict[str, list[torch.Tensor | None]] = {}
    others: list[str] = []
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(prefix):
            others.append(key)
            continue
        module_name = key[len(prefix) : -len(suffix)]
        pairs.setdefault(module_name, [None, None])[_SUFFIXES[suffix]] = tensor
    if others:
        raise _error(
            name,
            path,
            f"it holds {len(others)} tensor(s) that are not LoRA weights of the transformer "
            f"(e.g. {others[0]}); only transformer LoRA adapters are served",
        )
    if not pairs:
        raise _error(name, path, "it holds no LoRA weights")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks = set()
    for module_name, (down, up) in pairs.items():
        if down is None or up is None or down.dim() != 2 or up.dim() != 2:
            raise _error(name, path, f"{module_name} lacks its lora_A or lora_B matrix")
        if down.shape[0] != up.shape[1]:
            raise _error(name, path, f"{module_name}'s lora_A and lora_B ranks differ")
        ranks.add(down.shape[0])
        modules[module_name] = (down, up)
    rank = max(ranks)
    for module_name, (down, up) in modules.items():
        scale = _scaling(config, module_name, down.shape[0])
        modules[module_name] = (down.float(), up.float() * scale)
    return AdapterWeights(modules, rank)


def _scaling(config: Mapping[str, Any], module_name: str, rank: int) -> float:
    """PEFT's: alpha / rank (alpha / sqrt(rank) with rsLoRA), alpha per `alpha_pattern`."""
    alpha = float(config.get("lora_alpha") or rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module_name == pattern or module_name.endswith(f".{pattern}"):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_safetensors(
    file: Path, name: str, path: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not file.is_file():
        raise _error(name, path, f"{file.name} is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = handle.keys()  # a safetensors handle is not iterable
            return {key: handle.get_tensor(key) for key in keys}, metadata
    except Exception as error:  # safetensors' own error types vary by version
        raise _error(
            name, path, f"{file.name} is not a readable safetensors file ({error})"
        ) from None


def _read_json(file: Path, name: str, path: str) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise _error(name, path, f"{file.name} cannot be read ({error})") from None
    if not isinstance(value, dict):
        raise _error(name, path, f"{file.name} is not a JSON object")
    return value


def _error(name: str, path: str, why: str) -> LoRAAdapterError:
    return LoRAAdapterError(f"{LoRAAdapterError.prefix(name)} ({path}) cannot be served: {why}.")
