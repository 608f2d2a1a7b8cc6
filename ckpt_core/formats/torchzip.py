"""A lazy, safe index of any torch.save (zip) file: no storage is loaded, no code is run.

The pickle in `data.pkl` is replayed by the allow-listed unpickler of `unpickle.py` (the
`TENSORS` fragment, plus the fragments the format adds); tensors come out as `LazyTensor`
references (storage record, dtype, offset, shape, stride) and each is materialised later by
one ranged read of its bytes. The same works on a torch.save blob embedded at an offset in a
larger file (DCP's .distcp) and on any fsspec file.
"""

from __future__ import annotations

import io
import struct
import threading
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from ckpt_core.dtypes import Sized, flat_buffer, itemsize
from ckpt_core.errors import FormatError
from ckpt_core.formats.unpickle import TENSORS, Fragment, StorageRef, TensorRef, restricted_load
from ckpt_core.io.storage import Location

__all__ = ["LazyTensor", "LazyTorchFile", "iter_leaves", "iter_tensors"]

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
# read_range's whole copy of a non-contiguous tensor, kept for the next range of the same
# tensor (else each 8 MiB range rebuilds the whole tensor: quadratic). One per thread, dropped
# when the tensor's last range is read.
_HELD = threading.local()


class LazyTensor(TensorRef, Sized):
    """A tensor inside a torch.save file, known by where its bytes are."""

    def __init__(
        self,
        source: LazyTorchFile,
        storage: StorageRef,
        storage_offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> None:
        self.source = source
        self.storage = storage
        self.storage_offset = storage_offset
        self.shape = shape
        self.stride = stride
        self.dtype = storage.dtype

    def _span_elements(self) -> int:
        """Elements from storage_offset to the last element this view touches, inclusive."""
        if self.numel == 0:
            return 0
        return 1 + sum(
            (size - 1) * step for size, step in zip(self.shape, self.stride, strict=True)
        )

    def is_contiguous(self) -> bool:
        expected = 1
        for size, step in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and step != expected:
                return False
            expected *= size
        return True

    def read_range(self, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, start+count) in C order, 1-D: one ranged read when contiguous (into
        `out` when given)."""
        if start < 0 or count < 0 or start + count > self.numel:
            raise IndexError(
                f"{self.source.where}: elements [{start}, {start + count}) of {self.numel}"
            )
        flat = flat_buffer(out, count, self.dtype)
        if not self.is_contiguous():
            held = getattr(_HELD, "tensor", None)
            if held is None or held[0] is not self:
                held = _HELD.tensor = (self, self.materialize().reshape(-1))
            flat.copy_(held[1][start : start + count])
            if start + count == self.numel:
                _HELD.tensor = None
            return flat
        if self.storage_offset + self.numel > self.storage.numel:
            raise FormatError(
                f"{self.source.where}: tensor exceeds its storage {self.storage.key!r}"
            )
        if count:
            size = itemsize(self.dtype)
            begin = (
                self.source.record_offset(self.storage.key) + (self.storage_offset + start) * size
            )
            self.source.read_into(begin, flat)
        return flat

    def materialize(self) -> torch.Tensor:
        span = self._span_elements()
        if self.storage_offset + span > self.storage.numel:
            raise FormatError(
                f"{self.source.where}: tensor view exceeds its storage {self.storage.key!r} "
                f"({self.storage_offset}+{span} > {self.storage.numel} elements)"
            )
        flat = torch.empty(span, dtype=self.dtype)
        if span:
            start = self.source.record_offset(self.storage.key) + self.storage_offset * itemsize(
                self.dtype
            )
            self.source.read_into(start, flat)
        if self.is_contiguous():
            return flat.reshape(self.shape)
        return torch.as_strided(flat, self.shape, self.stride).contiguous()

    def __repr__(self) -> str:
        return f"LazyTensor({self.dtype}, {list(self.shape)}, {self.source.where})"


class LazyTorchFile:
    """One torch.save archive (a whole file, or a blob at [start, start+length) of a file)."""

    def __init__(
        self,
        root: Location,
        relative: str,
        *,
        start: int = 0,
        length: int | None = None,
        extra_globals: Fragment | None = None,
    ) -> None:
        self.root = root
        self.relative = relative
        self.start = start
        self.where = root.file(relative) + (f"@{start}" if start else "")
        self._length = length if length is not None else root.size(relative) - start
        self._records: dict[str, int] = {}  # record name -> data offset in the window
        self._sizes: dict[str, int] = {}
        self._read_directory()
        allowed = {**TENSORS, **extra_globals} if extra_globals else TENSORS
        data = self._record_bytes(self._prefix + "data.pkl")
        self.obj = restricted_load(data, self.where, allowed, self._tensor)

    # -- zip directory -------------------------------------------------------------------
    def _window(self) -> io.BufferedReader:
        raw = self.root.fs.open(self.root.file(self.relative), "rb")
        return io.BufferedReader(_Window(raw, self.start, self._length), buffer_size=1 << 16)

    def _read_directory(self) -> None:
        try:
            with self._window() as handle, zipfile.ZipFile(handle) as archive:
                for info in archive.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise FormatError(
                            f"{self.where}: record {info.filename} is compressed; torch.save never compresses"
                        )
                    handle.seek(info.header_offset)
                    fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
                    if fields[0] != b"PK\x03\x04":
                        raise FormatError(f"{self.where}: bad zip local header for {info.filename}")
                    data_offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
                    if data_offset + info.file_size > self._length:
                        raise FormatError(
                            f"{self.where}: record {info.filename} runs past the end of the file (truncated?)"
                        )
                    self._records[info.filename] = data_offset
                    self._sizes[info.filename] = info.file_size
        except zipfile.BadZipFile as e:
            raise FormatError(
                f"{self.where}: not a torch.save zip archive ({e}); legacy (pre-1.6) torch.save "
                "files are not supported: re-save with a current torch"
            ) from e
        pickles = [
            name for name in self._records if name.endswith("/data.pkl") or name == "data.pkl"
        ]
        if len(pickles) != 1:
            raise FormatError(f"{self.where}: expected one data.pkl record, found {len(pickles)}")
        self._prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._prefix + "byteorder"
        if byteorder in self._records and self._record_bytes(byteorder) != b"little":
            raise FormatError(f"{self.where}: big-endian torch.save files are not supported")

    def _record_bytes(self, name: str) -> bytes:
        offset = self.start + self._records[name]
        return self.root.read_bytes(self.relative, offset, offset + self._sizes[name])

    def record_offset(self, storage_key: str) -> int:
        name = f"{self._prefix}data/{storage_key}"
        if name not in self._records:
            raise FormatError(f"{self.where}: storage record {name!r} is missing")
        return self.start + self._records[name]

    def read_into(self, start: int, tensor: torch.Tensor) -> None:
        self.root.read_into(self.relative, start, tensor.view(torch.uint8).numpy().data)

    def _tensor(
        self, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> LazyTensor:
        """A tensor of the pickle, checked against the bytes really there before anything is
        allocated for it: a claim (2^80 elements, a storage larger than its record, a view
        outside its storage) is refused here, never trusted by a later torch.empty."""
        what = f"{self.where}: tensor on storage record {storage.key!r}"
        size = self._sizes.get(f"{self._prefix}data/{storage.key}")
        if size is None:
            raise FormatError(f"{what}: the record is missing")
        claimed = storage.numel * itemsize(storage.dtype)
        if claimed > size:
            raise FormatError(
                f"{what}: the storage claims {storage.numel} {storage.dtype} elements "
                f"({claimed} bytes) but its record holds {size} bytes (corrupt or hostile file)"
            )
        if len(shape) != len(stride) or offset < 0 or min((*shape, *stride), default=0) < 0:
            raise FormatError(
                f"{what}: malformed view (offset {offset}, shape {list(shape)}, stride "
                f"{list(stride)}): negative or mismatched"
            )
        lazy = LazyTensor(self, storage, offset, shape, stride)
        span = lazy._span_elements()
        if offset + span > storage.numel:
            raise FormatError(
                f"{what}: the view (offset {offset}, shape {list(shape)[:8]}, stride "
                f"{list(stride)[:8]}) reaches element {offset + span} of a "
                f"{storage.numel}-element storage (corrupt or hostile file)"
            )
        return lazy


class _Window(io.RawIOBase):
    """A read-only view of bytes [start, start+length) of a seekable file."""

    def __init__(self, raw: Any, start: int, length: int) -> None:
        self._raw = raw
        self._start = start
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._pos)
        if count <= 0:
            return 0
        self._raw.seek(self._start + self._pos)
        data = self._raw.read(count)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


def iter_leaves(
    obj: Any, leaves: type | tuple[type, ...], prefix: str = ""
) -> list[tuple[str, Any]]:
    """Flatten nested dicts to dotted names, keeping the values of type `leaves`, in order."""
    # An explicit stack, not recursion: a pickle can nest dicts 100k deep (RecursionError).
    found: list[tuple[str, Any]] = []
    stack: list[tuple[str, Any]] = [(prefix, obj)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, leaves):
            found.append((name, value))
        elif isinstance(value, Mapping):
            children = [
                (f"{name}.{key}" if name else str(key), child) for key, child in value.items()
            ]
            stack.extend(reversed(children))
    return found


def iter_tensors(obj: Any, prefix: str = "") -> list[tuple[str, LazyTensor]]:
    """The LazyTensors of a torch.save object (nested dicts), by dotted name, in order."""
    return iter_leaves(obj, LazyTensor, prefix)
