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
    "MAX_ENTRIES",
    "MAX_HEADER_BYTES",
    "json_budget",
    "build_header",
    "read_elements",
    "read_header",
    "read_tensor",
]

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit
# Tensors in one file: real files hold at most a few thousand (the largest models, ~150k
# tensors, are sharded at 5 GB); a hostile 100 MB header holds millions, costing GBs to parse.
MAX_ENTRIES = 200_000
_COMMAS_PER_ENTRY = 12  # a 9-dim tensor's entry has 12 commas; real ones have at most 8


def json_budget(raw: bytes, where: str, *, objects: int, values: int) -> None:
    """Refuse JSON that would build more than `objects` objects/arrays or `values` values,
    counted on the raw bytes before parsing (structural brackets and commas are never escaped,
    so the counts bound what json.loads would build: memory stays a small multiple of the
    limits, not of the bytes)."""
    containers = raw.count(b"{") + raw.count(b"[")
    commas = raw.count(b",")
    if containers > objects or commas > values:
        raise FormatError(
            f"{where}: {containers} objects/arrays and {commas} values is more than ckptflow "
            f"reads ({objects} and {values}; corrupt or hostile file)"
        )


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
    # An entry is one object and two arrays; __metadata__ and the header itself, a few more.
    json_budget(
        raw,
        where,
        objects=3 * MAX_ENTRIES + 16,
        values=_COMMAS_PER_ENTRY * MAX_ENTRIES + 10_000,
    )
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise FormatError(f"{where}: header is not valid JSON ({str(e)[:200]})") from e
    del raw
    if not isinstance(parsed, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    data_start = 8 + header_bytes
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    if len(parsed) > MAX_ENTRIES:
        raise FormatError(
            f"{where}: {len(parsed)} tensors in one file is more than ckptflow reads "
            f"({MAX_ENTRIES}; corrupt or hostile file)"
        )
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
                f"{where}: tensor {entry.name[:200]!r} at data offset {entry.begin - data_start} {problem}"
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
        raise FormatError(f"{where}: header entry {name[:200]!r} is malformed")
    dtype_name, shape_list, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if (
        not isinstance(dtype_name, str)
        or not _ints(shape_list)
        or not _ints(offsets)
        or len(offsets) != 2
        or len(shape_list) > 64
    ):
        raise FormatError(
            f"{where}: header entry {name[:200]!r} is malformed (dtype must be a string, shape "
            "a list of ints, data_offsets two ints)"
        )
    dtype = from_safetensors(dtype_name[:32], where)
    shape = tuple(shape_list)
    begin, end = offsets
    numel = 1
    for dim in shape:
        if dim < 0:
            raise FormatError(f"{where}: tensor {name[:200]!r} has a negative dimension")
        numel *= dim
    if begin < 0 or end < begin or end - begin != numel * itemsize(dtype):
        raise FormatError(
            f"{where}: tensor {name[:200]!r} data_offsets [{begin}, {end}] do not match its shape {list(shape)} and dtype"
        )
    return Entry(name, dtype, shape, data_start + begin, data_start + end)


def _ints(value: object) -> bool:
    """A JSON list of plain ints (no bools, floats or nested values)."""
    return isinstance(value, list) and all(type(v) is int for v in value)


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
