"""Streaming safetensors shard writer: header first, then each tensor's bytes, never a whole shard
in memory. The file is hashed as it is written, for the manifest."""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.errors import FormatError
from ckpt_core.formats.safetensors_header import build_header
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.stream import prefetch

__all__ = [
    "FileRecord",
    "HashingStream",
    "HashingWriter",
    "SAFETENSORS_METADATA",
    "hash_file",
    "write_bytes",
    "write_safetensors",
]

SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses files without it


@dataclass(frozen=True)
class FileRecord:
    name: str
    size_bytes: int
    sha256: str


_HASH_ASIDE_BYTES = 2**16  # smaller writes are hashed inline


class HashingWriter:
    """Wraps a binary file handle: counts and hashes every byte written through it. The hash
    of one buffer runs on a helper thread while the buffer is written (both release the GIL),
    and finishes before the next buffer is taken, so the caller may reuse or drop it."""

    def __init__(self, handle: object) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1)
        self.size_bytes = 0

    def write(self, data: bytes | memoryview) -> None:
        if len(data) < _HASH_ASIDE_BYTES:  # torch.save's headers and padding: not worth a thread
            self._hash.update(data)
            self._handle.write(data)  # type: ignore[attr-defined]
            self.size_bytes += len(data)
            return
        hashed = self._hasher.submit(self._hash.update, data)
        try:
            self._handle.write(data)  # type: ignore[attr-defined]
        finally:
            hashed.result()
        self.size_bytes += len(data)

    @property
    def sha256(self) -> str:
        self._hasher.shutdown()
        return self._hash.hexdigest()


class HashingStream(io.RawIOBase):
    """A HashingWriter as the file object that torch.save and DCP's writer write into: `tell`
    is the count of bytes written (DCP's offsets)."""

    def __init__(self, handle: object) -> None:
        super().__init__()
        self._out = HashingWriter(handle)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._out.write(view)
        return len(view)

    def tell(self) -> int:
        return self._out.size_bytes

    def record(self, name: str) -> FileRecord:
        """Once written: the file's size and sha256."""
        return FileRecord(name, self._out.size_bytes, self._out.sha256)


def write_safetensors(
    root: Location,
    filename: str,
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    chunks: Callable[[str], Iterator[torch.Tensor]],
    on_bytes: Callable[[int], None] | None = None,
) -> FileRecord:
    """Write one shard. `chunks(name)` yields the tensor as flat C-order chunks, already in
    its output dtype; they are produced one step ahead on a thread while this one writes and
    hashes, so memory is a few chunks and reading overlaps writing. Each chunk is written and
    hashed before the next is asked for, so `chunks` may reuse buffers (ChunkBuffers)."""
    header, sizes = build_header(list(tensors), SAFETENSORS_METADATA)
    planned = {name: (dtype, math.prod(shape)) for name, dtype, shape in tensors}

    def produced() -> Iterator[tuple[str, torch.Tensor]]:
        for name, _ in sizes:
            for chunk in chunks(name):
                yield name, chunk

    counted = dict.fromkeys(planned, 0)
    with root.writing(filename) as handle:
        out = HashingWriter(handle)
        out.write(header)
        for name, chunk in prefetch(produced()):
            dtype, numel = planned[name]
            counted[name] += chunk.numel()
            if chunk.dtype != dtype or counted[name] > numel:
                raise FormatError(f"{name}: produced {chunk.dtype} data beyond the planned {dtype}")
            if chunk.numel():
                out.write(chunk.contiguous().view(torch.uint8).numpy().data)
            if on_bytes:
                on_bytes(chunk.numel() * chunk.element_size())
        short = [n for n, (_, numel) in planned.items() if counted[n] != numel]
        if short:
            raise FormatError(f"{root.file(filename)}: fewer elements than planned for {short[:5]}")
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
