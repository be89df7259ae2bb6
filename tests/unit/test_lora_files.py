"""Reading LoRA adapters: diffusers' and PEFT's formats give one form, scaled as PEFT scales
them (the other layouts diffusers reads: test_lora_layouts.py); what cannot be served is
refused in one line naming the adapter and a reason, checked from the headers before any weight
is read, never quoting the files, and alike for a path with nothing there and one with
something unreadable or foreign."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from testing.tiny_lora import write_sparse_lora
from vllm_omni_images.engine.base import LoRAAdapter
from vllm_omni_images.engine.errors import LoRAAdapterError
from vllm_omni_images.engine.lora_files import (
    DIFFUSERS_METADATA_KEY,
    NOT_AN_ADAPTER,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    AdapterLayout,
    AdapterWeights,
    check_fits,
    check_rank,
    declared_layout,
    diffusers_state_dict,
    open_adapter,
    read_checked,
    read_layout,
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


def read_adapter(path: str | Path, name: str = "a") -> AdapterWeights:
    return read_layout(open_adapter(str(path), name), None, name).weights()


def inspect_adapter(path: str | Path, name: str = "a") -> AdapterLayout:
    """The adapter's layout from its header alone (diffusers' and PEFT's own names)."""
    layout = declared_layout(open_adapter(str(path), name), None, name)
    assert layout is not None
    return layout


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
        assert weights.rank == 2 and list(weights.modules) == [MODULE]
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
    check_fits(inspect_adapter(str(folder), "a"), Tiny(), "a")  # diffusers' names fit
    weights = read_adapter(str(folder), "a")
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
        ("text encoder", "LoRA weights of a text encoder"),
        ("bias", "1 tensor(s) besides LoRA weights of the transformer"),
        ("half", "lacks its lora_A or lora_B"),
        ("rank mismatch", "matrices of one rank"),
        ("integers", "not floating-point"),
        ("dora", "DoRA"),
        ("alpha not a number", "LoRA configuration"),
    ],
)
def test_an_adapter_that_cannot_be_served_is_refused_naming_it_and_why(
    tmp_path: Path, setup: str, reason: str
) -> None:
    path = tmp_path / "adapter"
    if setup == "text encoder":
        diffusers_file(path, extra={"text_encoder.SECRET.q.lora_A.weight": torch.zeros(2, 2)})
    elif setup == "bias":
        diffusers_file(path, extra={f"transformer.{MODULE}.lora_B.bias": torch.zeros(6)})
    elif setup in ("half", "rank mismatch", "integers"):
        tensors = {f"transformer.{MODULE}.lora_A.weight": torch.zeros(2, 8)}
        if setup == "rank mismatch":
            tensors[f"transformer.{MODULE}.lora_B.weight"] = torch.zeros(6, 3)
        if setup == "integers":
            tensors = {key: torch.zeros(2, 2, dtype=torch.int32) for key in diffusers_keys()}
        path.mkdir()
        save_file(tensors, str(path / "pytorch_lora_weights.safetensors"))
    elif setup == "dora":
        write_peft_folder(read_adapter(diffusers_file(tmp_path / "d")), path)
        config = json.loads((path / PEFT_CONFIG).read_text())
        (path / PEFT_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    elif setup == "alpha not a number":
        write_peft_folder(read_adapter(diffusers_file(tmp_path / "d")), path)
        config = json.loads((path / PEFT_CONFIG).read_text())
        (path / PEFT_CONFIG).write_text(json.dumps({**config, "lora_alpha": "SECRET"}))
    with pytest.raises(LoRAAdapterError) as refused:
        inspect_adapter(str(path), "style")
    message = str(refused.value)
    assert message.startswith("LoRA adapter 'style' cannot be served: ")
    assert reason in message and "\n" not in message
    assert "SECRET" not in message and str(path) not in message


def diffusers_keys() -> list[str]:
    return [f"transformer.{MODULE}.lora_{m}.weight" for m in "AB"]


def header_file(path: Path, header: object, data: bytes = b"") -> None:
    """A file in safetensors' layout with any header (JSON of `header`, or these bytes)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


SECRET = "SECRET-IN-HEADER-42"


def not_an_adapter(setup: str, tmp_path: Path) -> str:
    """A lora_path with nothing there, something the server cannot read, or no adapter: the
    file's own words (`SECRET`) wherever a header holds words."""
    path = tmp_path / "adapter"
    weights = path / "pytorch_lora_weights.safetensors"
    one = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    if setup == "missing":
        return str(tmp_path / "nowhere")
    if setup == "missing inside a file":  # a path through a file: ENOTDIR
        (tmp_path / "file").write_text("x")
        return str(tmp_path / "file" / "adapter")
    if setup == "NUL in the path":
        return f"{tmp_path}/a\x00b"
    if setup == "5000 characters":
        return "/" + "a" * 5000
    if setup == "a device":
        return "/dev/zero"
    if setup == "a FIFO":  # opened without blocking, and refused
        os.mkfifo(tmp_path / "fifo")
        return str(tmp_path / "fifo")
    path.mkdir()
    if setup == "empty folder":
        pass
    elif setup == "PEFT folder without weights":
        (path / PEFT_CONFIG).write_text("{}")
    elif setup == "PEFT config not JSON":
        (path / PEFT_CONFIG).write_text(f"{{{SECRET}")
        save_file({k: torch.zeros(2, 2) for k in diffusers_keys()}, str(path / PEFT_WEIGHTS))
    elif setup == "garbage":
        weights.write_bytes(b"\x00\x01" + SECRET.encode())
    elif setup == "header not JSON":
        header_file(weights, f'{{"{SECRET}": '.encode())
    elif setup == "header nested too deep":
        header_file(weights, b"[" * 100_000)
    elif setup == "header says more than the file holds":
        header_file(weights, {SECRET: one}, data=b"")
    elif setup == "overlapping tensors":
        header_file(weights, {SECRET: one, "b": one}, data=bytes(8))
    elif setup == "unknown dtype":
        header_file(weights, {"a": {**one, "dtype": SECRET}}, data=bytes(4))
    elif setup == "metadata not strings":
        header_file(weights, {"__metadata__": {SECRET: 1}, "a": one}, data=bytes(4))
    elif setup == "LoRA metadata not JSON":
        save_file(
            {k: torch.zeros(2, 2) for k in diffusers_keys()},
            str(weights),
            {DIFFUSERS_METADATA_KEY: SECRET},
        )
    elif setup == "no LoRA tensors":
        save_file({SECRET: torch.zeros(2)}, str(weights))
    elif setup == "a model's weights":
        save_file({f"transformer.{MODULE}.weight": torch.zeros(6, 8)}, str(weights))
    elif setup == "LoRA names, none a transformer's":
        save_file({f"{SECRET}.lora.weight": torch.zeros(2, 2)}, str(weights))
    return str(path)


NOT_ADAPTERS = [
    "missing",
    "missing inside a file",
    "NUL in the path",
    "5000 characters",
    "a device",
    "a FIFO",
    "empty folder",
    "PEFT folder without weights",
    "PEFT config not JSON",
    "garbage",
    "header not JSON",
    "header nested too deep",
    "header says more than the file holds",
    "overlapping tensors",
    "unknown dtype",
    "metadata not strings",
    "LoRA metadata not JSON",
    "no LoRA tensors",
    "a model's weights",
    "LoRA names, none a transformer's",
]


@pytest.mark.parametrize("setup", NOT_ADAPTERS)
def test_nothing_there_and_no_adapter_there_get_one_message_that_quotes_nothing(
    tmp_path: Path, setup: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client may not probe the server's files: whatever is not an adapter (nothing, no
    access, not safetensors, no LoRA weights) is refused in the same words, which quote
    neither the path nor the file; the server's log says what was wrong."""
    path = not_an_adapter(setup, tmp_path)
    with (
        caplog.at_level(logging.WARNING, logger="vllm_omni_images.engine.lora_files"),
        pytest.raises(LoRAAdapterError) as refused,
    ):
        inspect_adapter(path, "style")
    assert str(refused.value) == f"LoRA adapter 'style' cannot be served: {NOT_AN_ADAPTER}."
    assert "style" in caplog.text  # the log names it, with the reason


def test_the_rank_and_layers_are_checked_from_the_header_before_any_weight_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 GiB adapter (a sparse file: its weights are a hole) whose header declares a rank
    above the limit is refused having read its header alone: safetensors never opens it, and
    the process reads (read(2)) far less than its size."""
    rank = 2**24  # A (rank, 8) and B (6, rank) in float32: 896 MiB
    big = write_sparse_lora(tmp_path / "big.safetensors", MODULE, 8, 6, rank)
    assert big.stat().st_size > 2**29

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read")

    monkeypatch.setattr("safetensors.safe_open", no_weights)
    read_before = bytes_read()
    with pytest.raises(LoRAAdapterError, match=f"its rank {rank} is above --max-lora-rank 16"):
        read_checked(LoRAAdapter("big", 1, str(big)), 16, Tiny(), None)
    assert bytes_read() - read_before < 2**20
    # The layers too: an adapter of the right rank for another model is refused unread.
    other = torch.nn.Module()
    other.layer = torch.nn.Linear(8, 6)
    with pytest.raises(LoRAAdapterError, match="another model"):
        read_checked(LoRAAdapter("big", 1, str(big)), rank, other, None)
    assert bytes_read() - read_before < 2**20


def bytes_read() -> int:
    """What this process has read with read(2) and its kin (Linux's /proc/self/io rchar)."""
    try:
        io = Path("/proc/self/io").read_text()
    except OSError:
        pytest.skip("no /proc/self/io to count bytes read")
    return int(next(line for line in io.splitlines() if line.startswith("rchar:")).split()[1])


def test_the_header_reads_as_safetensors_reads_it(tmp_path: Path) -> None:
    from vllm_omni_images.engine.safetensors_header import read_header

    tensors = {"b": torch.zeros(3, 5, dtype=torch.bfloat16), "a": torch.ones(2, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"k": "v"})
    header = read_header(tmp_path / "f.safetensors")
    assert {name: entry.shape for name, entry in header.tensors.items()} == {"a": (2,), "b": (3, 5)}
    assert (header.tensors["a"].dtype, header.tensors["b"].dtype) == ("I64", "BF16")
    assert header.metadata == {"k": "v"}


def test_an_adapter_of_another_model_or_rank_is_refused(tmp_path: Path) -> None:
    layout = inspect_adapter(str(diffusers_file(tmp_path)), "a")
    check_fits(layout, Tiny(), "a")
    check_rank(layout, 2, "a")
    with pytest.raises(LoRAAdapterError, match="rank 2 is above --max-lora-rank 1"):
        check_rank(layout, 1, "a")
    wider = Tiny()
    wider.blocks[0].to_q = torch.nn.Linear(16, 6)
    with pytest.raises(LoRAAdapterError, match=r"another model.*maps 8 to 6.*maps 16 to 6"):
        check_fits(layout, wider, "a")
    other = torch.nn.Module()
    other.layer = torch.nn.Linear(8, 6)
    with pytest.raises(LoRAAdapterError, match=r"1 of its 1 layers are not layers of Module\.$"):
        check_fits(layout, other, "a")


def test_a_model_without_a_transformer_serves_no_adapter(tmp_path: Path) -> None:
    """A UNet pipeline (or a folder without a diffusers transformer) has nothing to adapt."""
    from vllm_omni_images.engine.lora_files import meta_transformer

    layout = inspect_adapter(str(diffusers_file(tmp_path / "a")), "a")
    assert meta_transformer(str(tmp_path)) is None
    with pytest.raises(LoRAAdapterError, match=r"'a'.*has no transformer"):
        check_fits(layout, None, "a")
