"""Bounded streaming of one tensor: flat C-order chunks, cast on the way, produced one step
ahead on a background thread so that reading/casting overlaps writing/hashing/comparing.

Memory stays about two chunks whatever the tensor's size (a 70B model's fp32 embedding is
4 GB): readers that can read a slice by byte range (`read_range`) are asked for chunks; the
others are read whole once and sliced.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Iterator
from typing import Protocol, TypeVar, runtime_checkable

import torch

from ckpt_core.dtypes import itemsize
from ckpt_core.reader import Reader, TensorInfo

CHUNK_BYTES = 8 * 2**20  # big enough for full-speed IO, small enough to keep a few in flight
T = TypeVar("T")


@runtime_checkable
class RangeReader(Protocol):
    def read_range(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start+count) of a tensor in C order, 1-D, stored dtype."""
        ...


def chunk_spans(
    numel: int, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES
) -> list[tuple[int, int]]:
    """(start, count) element spans covering a tensor, each at most `chunk_bytes` of `dtype`."""
    step = max(1, chunk_bytes // itemsize(dtype))
    return [(start, min(step, numel - start)) for start in range(0, numel, step)] or [(0, 0)]


def source_chunks(
    reader: Reader, info: TensorInfo, out_dtype: torch.dtype, chunk_bytes: int | None = None
) -> Iterator[torch.Tensor]:
    """A tensor as flat chunks in `out_dtype`, spans as `chunk_spans` on the wider of the two dtypes."""
    widest = info.dtype if itemsize(info.dtype) >= itemsize(out_dtype) else out_dtype
    spans = chunk_spans(info.numel, widest, chunk_bytes or CHUNK_BYTES)
    if len(spans) > 1 and isinstance(reader, RangeReader):
        for start, count in spans:
            yield reader.read_range(info.name, start, count).to(out_dtype)
        return
    flat = reader.read(info.name).reshape(-1)
    for start, count in spans:
        yield flat[start : start + count].to(out_dtype)


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


def prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
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
