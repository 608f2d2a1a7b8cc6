"""Streaming safetensors shard writer: header first, then each tensor's bytes, never a whole shard
in memory. The file is hashed as it is written, for the manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ckpt_core.errors import CkptError
from ckpt_core.safetensors_header import build_header
from ckpt_core.storage import Location

SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses files without it


@dataclass(frozen=True)
class FileRecord:
    name: str
    size_bytes: int
    sha256: str


class HashingWriter:
    """Wraps a binary file handle: counts and hashes every byte written through it."""

    def __init__(self, handle: object) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self.size_bytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self._handle.write(data)  # type: ignore[attr-defined]
        self.size_bytes += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def write_safetensors(
    root: Location,
    filename: str,
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    on_bytes: Callable[[int], None] | None = None,
) -> FileRecord:
    """Write one shard. `produce(name)` returns the tensor already in its output dtype."""
    header, sizes = build_header(list(tensors), SAFETENSORS_METADATA)
    expected = {name: (dtype, shape) for name, dtype, shape in tensors}
    with root.writing(filename) as handle:
        out = HashingWriter(handle)
        out.write(header)
        for name, nbytes in sizes:
            tensor = produce(name)
            dtype, shape = expected[name]
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise CkptError(
                    f"{name}: produced {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}"
                )
            if nbytes:
                out.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            if on_bytes:
                on_bytes(nbytes)
            del tensor
    return FileRecord(filename, out.size_bytes, out.sha256)


def write_bytes(root: Location, filename: str, data: bytes) -> FileRecord:
    root.put_bytes(filename, data)
    return FileRecord(filename, len(data), hashlib.sha256(data).hexdigest())


def hash_file(root: Location, filename: str, chunk_bytes: int = 16 * 2**20) -> FileRecord:
    """Size and sha256 of a written file, read back by ranges (a resumed run checks its shards)."""
    size = root.size(filename)
    digest = hashlib.sha256()
    for start in range(0, size, chunk_bytes):
        digest.update(root.read_bytes(filename, start, min(size, start + chunk_bytes)))
    return FileRecord(filename, size, digest.hexdigest())
