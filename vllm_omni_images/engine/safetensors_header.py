"""A safetensors file's header, read and checked without reading its tensors: each tensor's
name, dtype and shape, and the file's metadata.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian length, that
many bytes of JSON, then the tensors' bytes. `read_header` reads exactly those first bytes and
checks what `safetensors` itself checks before it maps a file: the JSON's form, known dtypes,
each tensor's byte range matching its shape, the ranges covering the data exactly, the file as
long as the header says.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 16 * 2**20
"""Headers above this are refused: a LoRA adapter's (some thousand tensors) is far smaller."""

METADATA_KEY = "__metadata__"

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
"""safetensors' dtypes (those `safetensors.torch` loads) and their sizes in bytes."""

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


class HeaderError(ValueError):
    """The file is not a safetensors file (or cannot be read). The message may quote the file:
    it is for the server's log, never for a client."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]


def read_header(file: Path) -> SafetensorsHeader:
    """The header of the safetensors file `file`; raises `HeaderError`. Reads only the header's
    bytes (at most 8 + `MAX_HEADER_BYTES`), never the tensors'."""
    try:
        # Not blocking on a FIFO: it, a device or a folder is refused once open, by its kind.
        with os.fdopen(os.open(file, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise HeaderError("not a regular file")
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise HeaderError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > status.st_size:
                raise HeaderError(f"a header of {length} bytes")
            raw = handle.read(length)
    except OSError as error:
        raise HeaderError(f"cannot be read ({error.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep
        raise HeaderError(f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise HeaderError("its header is not a JSON object")
    metadata = _metadata(header.pop(METADATA_KEY, None))
    tensors: dict[str, TensorEntry] = {}
    ranges: list[tuple[int, int]] = []
    for name, entry in header.items():
        tensors[name], byte_range = _tensor(name, entry)
        ranges.append(byte_range)
    end = 0
    for begin, stop in sorted(ranges):
        if begin != end:
            raise HeaderError("its tensors' byte ranges overlap or leave gaps")
        end = stop
    if 8 + length + end != status.st_size:
        raise HeaderError(f"{status.st_size} bytes long, its header says {8 + length + end}")
    return SafetensorsHeader(tensors, metadata)


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise HeaderError("its metadata is not a map of strings")
    return value


def _tensor(name: str, entry: Any) -> tuple[TensorEntry, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise HeaderError(f"tensor {name!r} has no entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise HeaderError(f"tensor {name!r} has an unknown dtype")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise HeaderError(f"tensor {name!r} has no valid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise HeaderError(f"tensor {name!r} has no valid data_offsets")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise HeaderError(f"tensor {name!r}'s bytes do not match its shape")
    return TensorEntry(dtype, tuple(shape)), (begin, end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
