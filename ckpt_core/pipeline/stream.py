"""Bounded streaming of one tensor: flat C-order chunks, cast on the way, produced one step
ahead on a background thread so that reading/casting overlaps writing/hashing/comparing.

Memory stays a few chunks whatever the tensor's size (a 70B model's fp32 embedding is
4 GB): readers that can read a slice by byte range (`read_range`) are asked for chunks; the
others are read whole once and sliced. Chunks are read into a few reused buffers
(`ChunkBuffers`): a fresh buffer costs a page fault per 4 KiB on first touch, measured here at
0.55 s/GB against 0.07 s/GB for a reused one, more than the read itself.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Iterator
from typing import Protocol, TypeVar, runtime_checkable

import torch

from ckpt_core.dtypes import itemsize
from ckpt_core.formats.protocol import Reader, TensorInfo
from ckpt_core.pipeline.casts import check_cast, narrows_range

__all__ = [
    "CHUNK_BYTES",
    "ChunkBuffers",
    "PREFETCH_DEPTH",
    "RangeReader",
    "chunk_spans",
    "prefetch",
    "release_freed_memory",
    "source_chunks",
]

CHUNK_BYTES = 8 * 2**20  # big enough for full-speed IO, small enough to keep a few in flight
PREFETCH_DEPTH = 1  # chunks produced ahead of the consumer
T = TypeVar("T")


@runtime_checkable
class RangeReader(Protocol):
    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements [start, start+count) of a tensor in C order, 1-D, stored dtype; read into
        `out` (`count` elements of that dtype) when given."""
        ...


class ChunkBuffers:
    """Reused chunk buffers, handed out in turn. A slot is handed out again `slots` takes
    later, so whoever consumes the chunks must be done with one before the producer takes
    `slots - 1` more: one being consumed, `PREFETCH_DEPTH` queued, one being filled."""

    def __init__(self, slots: int = PREFETCH_DEPTH + 2) -> None:
        self._slots: list[torch.Tensor | None] = [None] * slots
        self._next = 0
        self._scratch: torch.Tensor | None = None

    def take(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """`count` elements of `dtype` in the next slot (grown when too small)."""
        i, self._next = self._next, (self._next + 1) % len(self._slots)
        slot = self._slots[i] = _fit(self._slots[i], count * itemsize(dtype))
        return slot[: count * itemsize(dtype)].view(dtype)

    def scratch(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer the producer uses and is done with before it hands out a chunk (the
        stored-dtype read that is then cast into a slot)."""
        scratch = self._scratch = _fit(self._scratch, count * itemsize(dtype))
        return scratch[: count * itemsize(dtype)].view(dtype)


def _fit(buffer: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    if buffer is None or buffer.numel() < nbytes:
        return torch.empty(max(nbytes, CHUNK_BYTES), dtype=torch.uint8)
    return buffer


def chunk_spans(
    numel: int, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES
) -> list[tuple[int, int]]:
    """(start, count) element spans covering a tensor, each at most `chunk_bytes` of `dtype`."""
    step = max(1, chunk_bytes // itemsize(dtype))
    return [(start, min(step, numel - start)) for start in range(0, numel, step)] or [(0, 0)]


def source_chunks(
    reader: Reader,
    info: TensorInfo,
    out_dtype: torch.dtype,
    chunk_bytes: int | None = None,
    buffers: ChunkBuffers | None = None,
    *,
    check_overflow: bool = False,
) -> Iterator[torch.Tensor]:
    """A tensor as flat chunks in `out_dtype`, spans as `chunk_spans` on the wider of the two
    dtypes; with `buffers`, every chunk lives in one of them (see ChunkBuffers for how long).
    `check_overflow`: a finite value that the cast makes inf raises `CastOverflowError`."""
    widest = info.dtype if itemsize(info.dtype) >= itemsize(out_dtype) else out_dtype
    spans = chunk_spans(info.numel, widest, chunk_bytes or CHUNK_BYTES)
    check = check_overflow and narrows_range(info.dtype, out_dtype)

    def cast(chunk: torch.Tensor) -> torch.Tensor:
        if chunk.dtype == out_dtype:
            return chunk
        if buffers is None:
            out = chunk.to(out_dtype)
        else:
            out = buffers.take(chunk.numel(), out_dtype).copy_(chunk)
        if check:
            check_cast(info.name, chunk, out)
        return out

    if info.numel and isinstance(reader, RangeReader):
        for start, count in spans:
            if buffers is None:
                chunk = reader.read_range(info.name, start, count)
            elif info.dtype == out_dtype:
                chunk = reader.read_range(info.name, start, count, buffers.take(count, out_dtype))
            else:
                chunk = reader.read_range(
                    info.name, start, count, buffers.scratch(count, info.dtype)
                )
            yield cast(chunk)
        return
    flat = reader.read(info.name).reshape(-1)
    for start, count in spans:
        yield cast(flat[start : start + count])


def release_freed_memory() -> None:
    """Have glibc hand freed chunk buffers back to the OS at once. Its default raises the mmap
    threshold as buffers are freed, after which chunk-sized blocks stay in per-thread heaps and
    the resident set grows with the thread count. A process-wide setting, made by the
    conversion steps before they stream."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


def prefetch(items: Iterator[T], depth: int = PREFETCH_DEPTH) -> Iterator[T]:
    """Run `items` on a background thread, at most `depth` ready ahead of the consumer.
    torch copies, file reads and hashing release the GIL, so the two sides overlap."""
    ready: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put(("item", item))
            ready.put(("done", None))
        except BaseException as e:  # handed to the consumer, raised there
            ready.put(("error", e))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "done":
                return
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.01)
