"""Read and validate a safetensors header with two small ranged reads; build one for writing."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from ckpt_core.dtypes import flat_buffer, from_safetensors, itemsize, to_safetensors
from ckpt_core.errors import FormatError
from ckpt_core.io.storage import Location

__all__ = [
    "Entry",
    "Header",
    "MAX_HEADER_BYTES",
    "build_header",
    "read_elements",
    "read_header",
    "read_tensor",
]

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]  # in data order
    metadata: dict[str, str]
    data_start: int


def read_header(root: Location, relative: str) -> Header:
    where = root.file(relative)
    if not root.exists(relative):
        raise FormatError(f"{where}: file is missing")
    file_bytes = root.size(relative)
    if file_bytes < 8:
        raise FormatError(
            f"{where}: {file_bytes} bytes is too short for a safetensors file (truncated?)"
        )
    (header_bytes,) = struct.unpack("<Q", root.read_bytes(relative, 0, 8))
    if header_bytes > MAX_HEADER_BYTES:
        raise FormatError(
            f"{where}: header length {header_bytes} exceeds the 100 MB limit (corrupt or hostile file)"
        )
    if 8 + header_bytes > file_bytes:
        raise FormatError(
            f"{where}: header length {header_bytes} runs past the end of the {file_bytes}-byte file (truncated?)"
        )
    raw = root.read_bytes(relative, 8, 8 + header_bytes)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: header is not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    data_start = 8 + header_bytes
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    entries = [_entry(where, name, value, data_start) for name, value in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor = data_start
    for entry in entries:
        if entry.begin != cursor:
            problem = (
                "overlaps the previous tensor"
                if entry.begin < cursor
                else "leaves a hole before it"
            )
            raise FormatError(
                f"{where}: tensor {entry.name!r} at data offset {entry.begin - data_start} {problem}"
            )
        cursor = entry.end
    if cursor != file_bytes:
        state = "truncated" if cursor > file_bytes else "has trailing bytes"
        raise FormatError(
            f"{where}: data ends at byte {cursor} but the file has {file_bytes} bytes ({state})"
        )
    return Header({e.name: e for e in entries}, dict(metadata), data_start)


def _entry(where: str, name: str, value: object, data_start: int) -> Entry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: header entry {name!r} is malformed")
    dtype = from_safetensors(str(value["dtype"]), where)
    shape = tuple(int(d) for d in value["shape"])
    begin, end = (int(x) for x in value["data_offsets"])
    numel = 1
    for dim in shape:
        if dim < 0:
            raise FormatError(f"{where}: tensor {name!r} has a negative dimension")
        numel *= dim
    if begin < 0 or end < begin or end - begin != numel * itemsize(dtype):
        raise FormatError(
            f"{where}: tensor {name!r} data_offsets [{begin}, {end}] do not match its shape {list(shape)} and dtype"
        )
    return Entry(name, dtype, shape, data_start + begin, data_start + end)


def build_header(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[str, int]]]:
    """The header bytes (length prefix included, padded to 8) and each tensor's byte count, in order."""
    layout: dict[str, object] = {"__metadata__": metadata}
    sizes: list[tuple[str, int]] = []
    offset = 0
    for name, dtype, shape in tensors:
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * itemsize(dtype)
        layout[name] = {
            "dtype": to_safetensors(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        sizes.append((name, nbytes))
        offset += nbytes
    text = json.dumps(layout, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, sizes


def read_elements(
    root: Location,
    relative: str,
    entry: Entry,
    start: int,
    count: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elements [start, start+count) of a tensor, flat, by one ranged read (into `out` when
    given)."""
    size = itemsize(entry.dtype)
    if start < 0 or count < 0 or entry.begin + (start + count) * size > entry.end:
        raise IndexError(
            f"{root.file(relative)}: {entry.name}: elements [{start}, {start + count})"
        )
    flat = flat_buffer(out, count, entry.dtype)
    if count:
        root.read_into(relative, entry.begin + start * size, flat.view(torch.uint8).numpy().data)
    return flat


def read_tensor(root: Location, relative: str, entry: Entry) -> torch.Tensor:
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.end > entry.begin:
        root.read_into(relative, entry.begin, tensor.view(-1).view(torch.uint8).numpy().data)
    return tensor
