"""The inputs an attacker (or an unlucky client) sends in issue 31's adversarial cases: images
that are elongated, rotated by EXIF, 16-bit, palette, CMYK or LA; masks drawn on them; LoRA
adapter files whose header holds a secret or promises a huge rank. Shared by
`testing/adversarial_cases.py` (the cases) and `benchmarks/adversarial.py`."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
"""The EXIF tag a camera writes when it stored the picture turned (6: turn 90 degrees clockwise
to display it)."""

RED = (220, 30, 30)
BLUE = (30, 30, 220)
SECRET = "SECRET-IN-HEADER-42"


def encoded(image: Image.Image, format: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def plain_png(width: int, height: int, colour: tuple[int, int, int] = RED) -> bytes:
    """A one-colour RGB PNG; an elongated one compresses to a few KB however many pixels it
    has (8x2097152: 51 KB)."""
    return encoded(Image.new("RGB", (width, height), colour))


def hole_mask(width: int, height: int, hole: tuple[int, int, int, int]) -> bytes:
    """A mask PNG: opaque (kept) everywhere but the transparent `hole` box (edited)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), hole)
    return encoded(mask)


def exif_rotated_jpeg(stored: tuple[int, int] = (64, 32)) -> bytes:
    """A JPEG stored `stored` wide-by-high, left half red and right half blue, with EXIF
    Orientation 6: a photo viewer shows it turned clockwise, `stored[1]`x`stored[0]`, red on
    top and blue below."""
    width, height = stored
    image = Image.new("RGB", stored, BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encoded(image, "JPEG", quality=95, exif=exif.tobytes())


def gray16_png(size: int = 64, level: int = 20000) -> tuple[bytes, float]:
    """A 16-bit grayscale PNG (Pillow's `I;16`) of one `level` out of 65535, and the 8-bit
    brightness a viewer shows for it (`level` / 257)."""
    image = Image.fromarray(np.full((size, size), level, dtype=np.uint16))
    return encoded(image), level / 257


def mode_png_or_jpeg(mode: str, size: int = 64) -> tuple[bytes, tuple[float, float, float]]:
    """An input in `mode` (`P` palette PNG, `LA` PNG, `CMYK` JPEG) of one colour, and the RGB
    a viewer shows for it (Pillow's own conversion of the decoded file)."""
    if mode == "P":
        data = encoded(Image.new("RGB", (size, size), RED).convert("P"))
    elif mode == "LA":
        data = encoded(Image.new("LA", (size, size), (90, 255)))
    elif mode == "CMYK":
        data = encoded(Image.new("CMYK", (size, size), (20, 160, 160, 40)), "JPEG", quality=95)
    else:
        raise ValueError(mode)
    shown = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)
    mean = shown.reshape(-1, 3).mean(axis=0)
    return data, (float(mean[0]), float(mean[1]), float(mean[2]))


def mean_rgb(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, float, float]:
    region = np.asarray(image.convert("RGB").crop(box), dtype=float).reshape(-1, 3)
    mean = region.mean(axis=0)
    return (round(float(mean[0]), 1), round(float(mean[1]), 1), round(float(mean[2]), 1))


def copy_adapter(source: Path, folder: Path) -> Path:
    """A copy of the adapter folder `source` at `folder` (its files may then be deleted)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    return folder


def secret_header_adapter(folder: Path) -> Path:
    """A safetensors file whose header (a tensor name and a metadata value) holds `SECRET`."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_lora_weights.safetensors"
    save_file({SECRET: np.zeros(4, np.float32)}, str(path), metadata={"note": SECRET})
    return path


def sparse_big_rank_adapter(source: Path, folder: Path, size_bytes: int) -> tuple[Path, int]:
    """An adapter of `size_bytes` (a sparse file: it takes no disk) for one real layer of the
    model `source` (an adapter folder in diffusers' format) adapts, of the rank that fills it;
    its header alone says the rank. Returns the file and the rank."""
    weights = source / "pytorch_lora_weights.safetensors"
    header = _safetensors_header(weights)
    down = next(name for name in header if name.endswith(".lora_A.weight"))
    up = down.replace(".lora_A.", ".lora_B.")
    in_features = header[down]["shape"][1]
    out_features = header[up]["shape"][0]
    rank = size_bytes // (4 * (in_features + out_features))
    down_bytes = 4 * rank * in_features
    up_bytes = 4 * rank * out_features
    entries = {
        down: {"dtype": "F32", "shape": [rank, in_features], "data_offsets": [0, down_bytes]},
        up: {
            "dtype": "F32",
            "shape": [out_features, rank],
            "data_offsets": [down_bytes, down_bytes + up_bytes],
        },
    }
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_lora_weights.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        file.truncate(8 + len(text) + down_bytes + up_bytes)
    return path, rank


def _safetensors_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header: dict[str, dict] = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header
