"""Reading LoRA adapters: diffusers' and PEFT's formats give one form, scaled as PEFT scales
them; what cannot be served is refused in one line naming the adapter and its path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vllm_omni_images.engine.errors import LoRAAdapterError
from vllm_omni_images.engine.lora_files import (
    DIFFUSERS_METADATA_KEY,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    check_fits,
    check_rank,
    diffusers_state_dict,
    read_adapter,
    write_peft_folder,
)

MODULE = "blocks.0.to_q"


class Tiny(torch.nn.Module):
    """A model with one attention-like block: `blocks.0.to_q` (8 -> 6) and `to_out.0`."""

    def __init__(self) -> None:
        super().__init__()
        block = torch.nn.Module()
        block.to_q = torch.nn.Linear(8, 6)
        block.to_out = torch.nn.ModuleList([torch.nn.Linear(6, 8), torch.nn.Dropout()])
        self.blocks = torch.nn.ModuleList([block])


def pair(rank: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rank, 8, generator=generator), torch.randn(6, rank, generator=generator)


def diffusers_file(
    folder: Path, alpha: float | None = None, extra: dict[str, torch.Tensor] | None = None
) -> Path:
    down, up = pair()
    tensors = {
        f"transformer.{MODULE}.lora_A.weight": down,
        f"transformer.{MODULE}.lora_B.weight": up,
        **(extra or {}),
    }
    metadata = {"format": "pt"}
    if alpha is not None:
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(
            {"transformer.lora_alpha": alpha, "transformer.r": 2}
        )
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return folder


def test_diffusers_format_folder_and_file_read_alike(tmp_path: Path) -> None:
    folder = diffusers_file(tmp_path / "a")
    from_folder = read_adapter(str(folder), "a")
    from_file = read_adapter(str(folder / "pytorch_lora_weights.safetensors"), "a")
    down, up = pair()
    for weights in (from_folder, from_file):
        assert weights.rank == 2 and weights.target_modules == ["to_q"]
        got_down, got_up = weights.modules[MODULE]
        assert torch.equal(got_down, down) and torch.equal(got_up, up)  # alpha = rank: x1


def test_alpha_is_folded_into_b(tmp_path: Path) -> None:
    weights = read_adapter(str(diffusers_file(tmp_path, alpha=8)), "a")
    assert torch.allclose(weights.modules[MODULE][1], pair()[1] * 4)  # alpha 8 / rank 2


def test_peft_format_reads_like_diffusers_and_round_trips(tmp_path: Path) -> None:
    original = read_adapter(str(diffusers_file(tmp_path / "d", alpha=4)), "a")
    peft = tmp_path / "peft"
    write_peft_folder(original, peft)
    config = json.loads((peft / PEFT_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 2, ["to_q"])
    again = read_adapter(str(peft), "a")
    assert torch.equal(again.modules[MODULE][1], original.modules[MODULE][1])


def test_vllm_omni_gets_its_own_name_for_the_output_projection(tmp_path: Path) -> None:
    down, up = torch.ones(2, 6), torch.ones(8, 2)
    folder = diffusers_file(
        tmp_path,
        extra={
            "transformer.blocks.0.to_out.0.lora_A.weight": down,
            "transformer.blocks.0.to_out.0.lora_B.weight": up,
        },
    )
    weights = read_adapter(str(folder), "a")
    check_fits(weights, Tiny(), "a", str(folder))  # diffusers' names fit diffusers' model
    write_peft_folder(weights, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["target_modules"] == ["to_out", "to_q"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "peft" / PEFT_WEIGHTS), framework="pt") as handle:
        assert "base_model.model.blocks.0.to_out.lora_A.weight" in handle.keys()  # noqa: SIM118
    assert set(diffusers_state_dict(weights)) == {
        f"transformer.{name}.lora_{m}.weight"
        for name in (MODULE, "blocks.0.to_out.0")
        for m in "AB"
    }


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("missing", "no file or folder"),
        ("empty folder", "neither"),
        ("corrupt", "not a readable safetensors"),
        ("text encoder", "not LoRA weights of the transformer"),
        ("half", "lacks its lora_A or lora_B"),
        ("dora", "DoRA"),
    ],
)
def test_what_cannot_be_read_is_refused_naming_the_adapter(
    tmp_path: Path, setup: str, reason: str
) -> None:
    path = tmp_path / "adapter"
    if setup == "empty folder":
        path.mkdir()
    elif setup == "corrupt":
        path.mkdir()
        (path / "pytorch_lora_weights.safetensors").write_bytes(b"\x00\x01garbage")
    elif setup == "text encoder":
        diffusers_file(path, extra={"text_encoder.layers.0.q.lora_A.weight": torch.zeros(2, 2)})
    elif setup == "half":
        path.mkdir()
        save_file(
            {f"transformer.{MODULE}.lora_A.weight": torch.zeros(2, 8)},
            str(path / "pytorch_lora_weights.safetensors"),
        )
    elif setup == "dora":
        write_peft_folder(read_adapter(str(diffusers_file(tmp_path / "d")), "x"), path)
        config = json.loads((path / PEFT_CONFIG).read_text())
        (path / PEFT_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAAdapterError) as refused:
        read_adapter(str(path), "style")
    message = str(refused.value)
    assert message.startswith("LoRA adapter 'style'") and str(path) in message
    assert reason in message and "\n" not in message


def test_an_adapter_of_another_model_or_rank_is_refused(tmp_path: Path) -> None:
    weights = read_adapter(str(diffusers_file(tmp_path)), "a")
    check_fits(weights, Tiny(), "a", "p")
    check_rank(weights, 2, "a", "p")
    with pytest.raises(LoRAAdapterError, match="rank 2 is above --max-lora-rank 1"):
        check_rank(weights, 1, "a", "p")
    wider = Tiny()
    wider.blocks[0].to_q = torch.nn.Linear(16, 6)
    with pytest.raises(LoRAAdapterError, match=r"another model.*maps 8 to 6.*maps 16 to 6"):
        check_fits(weights, wider, "a", "p")
    other = torch.nn.Module()
    other.layer = torch.nn.Linear(8, 6)
    with pytest.raises(LoRAAdapterError, match=r"has no layer blocks\.0\.to_q"):
        check_fits(weights, other, "a", "p")


def test_a_model_without_a_transformer_serves_no_adapter(tmp_path: Path) -> None:
    """A UNet pipeline (or a folder without a diffusers transformer) has nothing to adapt."""
    from vllm_omni_images.engine.lora_files import meta_transformer

    weights = read_adapter(str(diffusers_file(tmp_path / "a")), "a")
    assert meta_transformer(str(tmp_path)) is None
    with pytest.raises(LoRAAdapterError, match=r"'a'.*has no transformer"):
        check_fits(weights, None, "a", "p")
