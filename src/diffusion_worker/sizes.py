"""Component sizes from the weight files' safetensors headers: no weights loaded, no torch imported.

A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON naming every tensor's
dtype and shape, so a component's size at any precision is known from a few kilobytes of each file. Tiny and real
models are read the same way.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# Bytes per element of the safetensors dtypes; floating tensors are loaded at the runtime precision, the others as
# stored.
STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
STORED_BYTES |= {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
RUNTIME_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# A header larger than this is not one: a truncated or foreign file.
MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file holds, by name: {"dtype": ..., "shape": [...], "data_offsets": [...]}."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header of {length} bytes)")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The files a loader reads: the variant's (model.fp16.safetensors, shards included) where the folder has them,
    else the plain ones (model.safetensors, model-00001-of-00002.safetensors)."""
    every = sorted(folder.glob("*.safetensors"))
    if variant:
        of_variant = [path for path in every if f".{variant}" in path.name]
        if of_variant:
            return of_variant
    return [path for path in every if "." not in path.name.removesuffix(".safetensors")]


def component_bytes(folder: Path, variant: str | None, dtype: str) -> int:
    """The memory a component's tensors take once loaded at `dtype` ("float16", "bfloat16" or "float32")."""
    files = weight_files(folder, variant)
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights")
    total = 0
    for path in files:
        for tensor in read_header(path).values():
            element = RUNTIME_BYTES[dtype] if tensor["dtype"] in FLOAT_DTYPES else STORED_BYTES[tensor["dtype"]]
            total += math.prod(tensor["shape"]) * element
    return total
