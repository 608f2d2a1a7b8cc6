"""The device path ("load shards per rank on GPU, merge, cast"): `--device cuda|auto`.

A tensor's rank pieces are read by ranged reads into pinned host buffers and copied, each into
its place, into one tensor on the device (the merge: the reader's TP/FSDP/DCP/DeepSpeed rule
says where each piece's elements go); the cast and its overflow check run there, and the
result comes back in chunks through pinned host buffers to whoever writes or compares it.
One tensor (or one window of a tensor larger than the device budget) is on the device at a
time per stream, plus what `prefetch` produces ahead; never the whole model. Readers that
only read whole tensors (`tp-ranks`, `fsdp-ranks`) merge in their `read` on the host; the
merged tensor is then placed and cast the same way.

The output is byte-identical to the host path: casts between IEEE formats round to nearest
even on both, and a window holding NaN is cast on the host (CUDA writes a canonical NaN where
the CPU kernels keep the sign or write 0xffff), so NaN bytes match too. The same code runs
with the placement on the CPU (pageable buffers, no streams or events), which is how the
tests exercise it where there is no GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.dtypes import itemsize
from ckpt_core.errors import UsageError
from ckpt_core.formats.protocol import Reader, TensorInfo
from ckpt_core.pipeline.casts import check_cast, narrows_range
from ckpt_core.pipeline.stream import (
    CHUNK_BYTES,
    PREFETCH_DEPTH,
    ChunkBuffers,
    RangeReader,
    chunk_spans,
    source_chunks,
)

__all__ = [
    "ChunkSource",
    "DeviceStream",
    "PLACEMENT_ENV",
    "Placement",
    "chunk_source",
    "host_buffer",
    "placement_for",
    "read_whole",
]

# Tests and benches only: "cpu" runs `--device cpu` through this module with the placement on
# the host, so the device code is exercised (and timed) where there is no GPU.
PLACEMENT_ENV = "CKPTFLOW_TEST_PLACEMENT"
# Share of the device's memory one stream's window (stored + cast copy) may take: a conversion
# runs a few streams (shard writers) and each may hold one window plus a prefetched one.
_DEVICE_SHARE = 8

ChunkSource = Callable[[Reader, TensorInfo, torch.dtype], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class Placement:
    """Where tensors are merged and cast, and how much of one a stream holds there at once
    (`window_bytes`: stored plus cast bytes; a larger tensor goes through in windows)."""

    device: torch.device
    window_bytes: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def placement_for(flag: str, *, option: str = "--device") -> Placement | None:
    """The placement `--device FLAG` asks for; None for the host path. `cuda` where CUDA is
    not usable is a `UsageError` naming the flag; `auto` is cuda when present, else the host."""
    if flag == "cpu":
        if os.environ.get(PLACEMENT_ENV) == "cpu":
            return Placement(torch.device("cpu"), 2**62)
        return None
    if flag not in ("cuda", "auto"):
        raise UsageError(f"{option} {flag}: choose cpu, cuda or auto")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(device).total_memory
        return Placement(device, total // _DEVICE_SHARE)
    if flag == "auto":
        return None
    why = (
        f"this torch {torch.__version__} is built without CUDA"
        if torch.version.cuda is None
        else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)"
    )
    raise UsageError(f"{option} cuda: CUDA is not available: {why}; use {option} cpu or auto")


def chunk_source(
    flag: str, *, option: str = "--device", chunk_bytes: int = CHUNK_BYTES
) -> ChunkSource:
    """Source tensors as flat host chunks cast to a dtype, for one consumer stream: through the
    device `flag` names, or the host path (`source_chunks`); the same spans either way. The hook
    other commands (`verify --device`) call; chunks live in reused buffers, so the consumer is
    done with one before asking for the one after next (as with ChunkBuffers)."""
    placement = placement_for(flag, option=option)
    if placement is not None:
        return DeviceStream(placement, chunk_bytes).chunks
    buffers = ChunkBuffers()

    def host(reader: Reader, info: TensorInfo, out_dtype: torch.dtype) -> Iterator[torch.Tensor]:
        return source_chunks(reader, info, out_dtype, chunk_bytes, buffers)

    return host


def host_buffer(nbytes: int, *, pin: bool) -> torch.Tensor:
    """`nbytes` of host memory, page-locked when asked and possible (a CPU-only torch has no
    pinned allocator and raises: pageable memory then, which only makes copies synchronous)."""
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


class _Ring:
    """Reused host buffers handed out in turn, each with the event of the last asynchronous
    copy that used it: taking a slot waits for that copy first."""

    def __init__(self, slots: int, *, pin: bool) -> None:
        self._pin = pin
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._fences: list[Any] = [None] * slots
        self._next = 0

    def take(self, count: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        i, self._next = self._next, (self._next + 1) % len(self._buffers)
        if self._fences[i] is not None:
            self._fences[i].synchronize()
            self._fences[i] = None
        nbytes = count * itemsize(dtype)
        buffer = self._buffers[i]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[i] = host_buffer(max(nbytes, CHUNK_BYTES), pin=self._pin)
        return i, buffer[:nbytes].view(dtype)

    def fence(self, i: int, event: Any) -> None:
        self._fences[i] = event


class DeviceStream:
    """One consumer's stream of tensors through the device: its own CUDA stream, staging
    buffers for the pieces going up and the chunks coming down (pinned on CUDA)."""

    def __init__(self, placement: Placement, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.placement = placement
        self.chunk_bytes = chunk_bytes
        cuda = placement.is_cuda
        self._stream = torch.cuda.Stream(device=placement.device) if cuda else None  # type: ignore[no-untyped-call]
        self._up = _Ring(2, pin=cuda)  # one being read from the file, one being copied up
        self._down = _Ring(PREFETCH_DEPTH + 2, pin=cuda)  # as ChunkBuffers: see its slots

    # -- stream plumbing (no-ops on the CPU) --------------------------------------------------
    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return (
            torch.cuda.stream(self._stream)
            if self._stream is not None
            else contextlib.nullcontext()
        )

    def _event(self) -> Any:
        if self._stream is None:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._stream)
        return event

    def _wait(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    # -- the path ----------------------------------------------------------------------------
    def chunks(
        self,
        reader: Reader,
        info: TensorInfo,
        out_dtype: torch.dtype,
        *,
        check_overflow: bool = False,
    ) -> Iterator[torch.Tensor]:
        """A tensor as flat host chunks in `out_dtype`, merged and cast on the device: the spans
        `source_chunks` yields (on the wider dtype), each in a reused buffer (see ChunkBuffers)."""
        if not info.numel:
            yield from source_chunks(reader, info, out_dtype)
            return
        per_element = itemsize(info.dtype) + (itemsize(out_dtype) if out_dtype != info.dtype else 0)
        widest = max(itemsize(info.dtype), itemsize(out_dtype))
        step = max(1, self.chunk_bytes // widest)  # host-path chunk: windows are whole chunks
        window = max(step, self.placement.window_bytes // per_element // step * step)
        wider = info.dtype if itemsize(info.dtype) >= itemsize(out_dtype) else out_dtype
        whole = None if isinstance(reader, RangeReader) else reader.read(info.name).reshape(-1)
        check = check_overflow and narrows_range(info.dtype, out_dtype)
        for first in range(0, info.numel, window):
            count = min(window, info.numel - first)
            # Passed, not named here: the cast's frame alone holds the window and lets it go
            # once cast.
            yield from self._cast_down(
                info.name, self._place(reader, info, first, count, whole), out_dtype, wider, check
            )

    def _place(
        self,
        reader: Reader,
        info: TensorInfo,
        first: int,
        count: int,
        whole: torch.Tensor | None,
    ) -> torch.Tensor:
        """Elements [first, first+count) on the device, stored dtype: each ranged read lands in
        a pinned buffer and is copied to its place while the next one is read."""
        dtype, device, cuda = info.dtype, self.placement.device, self.placement.is_cuda
        with self._on_stream():
            placed = torch.empty(count, dtype=dtype, device=device)
        if whole is not None:
            with self._on_stream():
                placed.copy_(whole[first : first + count])
            return placed
        assert isinstance(reader, RangeReader)
        for start, n in chunk_spans(count, dtype, self.chunk_bytes):
            slot, staged = self._up.take(n, dtype)
            reader.read_range(info.name, first + start, n, staged)
            with self._on_stream():
                placed[start : start + n].copy_(staged, non_blocking=cuda)
            self._up.fence(slot, self._event())
        return placed

    def _cast_down(
        self,
        name: str,
        source: torch.Tensor,
        out_dtype: torch.dtype,
        wider: torch.dtype,
        check: bool,
    ) -> Iterator[torch.Tensor]:
        """Cast on the device, then back to the host chunk by chunk."""
        if source.dtype != out_dtype and source.is_floating_point():
            with self._on_stream():
                has_nan = bool(torch.isnan(source).any())
            if has_nan:  # the CPU's NaN bytes, not the device's canonical NaN
                yield from self._cast_on_host(name, source, out_dtype, wider, check)
                return
        with self._on_stream():
            out = source if source.dtype == out_dtype else source.to(out_dtype)
            if check:
                check_cast(name, source, out)
        del source  # the cast is queued on this stream: its memory is reused in order
        cuda = self.placement.is_cuda
        for start, n in chunk_spans(out.numel(), wider, self.chunk_bytes):
            _, host = self._down.take(n, out_dtype)
            with self._on_stream():
                host.copy_(out[start : start + n], non_blocking=cuda)
            self._wait()
            yield host

    def _cast_on_host(
        self,
        name: str,
        source: torch.Tensor,
        out_dtype: torch.dtype,
        wider: torch.dtype,
        check: bool,
    ) -> Iterator[torch.Tensor]:
        """The stored values back to the host in chunks, cast there (as the host path does)."""
        cuda = self.placement.is_cuda
        for start, n in chunk_spans(source.numel(), wider, self.chunk_bytes):
            slot, stored = self._up.take(n, source.dtype)
            with self._on_stream():
                stored.copy_(source[start : start + n], non_blocking=cuda)
            self._wait()
            _, out = self._down.take(n, out_dtype)
            out.copy_(stored)
            if check:
                check_cast(name, stored, out)
            yield out


def read_whole(
    chunks: Iterator[torch.Tensor], info: TensorInfo, dtype: torch.dtype
) -> torch.Tensor:
    """A tensor of its own (shape `info.shape`, `dtype`) from flat chunks that may reuse
    buffers: for the formats that need whole tensors in memory (`merge --format bin`)."""
    out = torch.empty(info.numel, dtype=dtype)
    filled = 0
    for chunk in chunks:
        out[filled : filled + chunk.numel()].copy_(chunk)
        filled += chunk.numel()
    if filled != info.numel:
        raise ValueError(f"{info.name}: {filled} of {info.numel} elements produced")
    return out.view(info.shape)
