"""`--to dcp`: a torch Distributed Checkpoint written by DCP itself, one tensor at a time.

`dcp.save` runs in this one process with DCP's own planner and `FileSystemWriter` (so the
`.metadata` and `__0_0.distcp` files are exactly what `dcp.load` and FSDP expect), on two
small seams:
- the state dict holds meta tensors (shape and dtype, no data) for planning; the planner's
  `lookup_object` materialises a tensor from the source only when the writer serialises it,
  into one buffer reused for every tensor (`one_buffer`: one tensor in memory, never the
  state dict, and no fresh pages to fault in per tensor);
- the writer's file system is the work directory's `Location`: each file appears whole or not
  at all (any fsspec URL), hashed as it is written for the manifest.
`storage_meta` (the path written to and a random save id) is left out: the same conversion
writes the same bytes, and the staging path never reaches the output.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import posixpath
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex, StorageMeta
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ckpt_core.dtypes import itemsize
from ckpt_core.errors import FormatError
from ckpt_core.formats.dcp import METADATA
from ckpt_core.formats.unpickle import DCP_METADATA, restricted_load
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.writer import FileRecord, HashingStream, hash_file

__all__ = ["Layout", "expected_fqns", "metadata_record", "one_buffer", "saved_fqns", "write_dcp"]

Layout = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]  # output name, dtype, shape


def write_dcp(
    work: Location,
    layout: Layout,
    produce: Callable[[str], torch.Tensor],
    *,
    key: str | None,
    data_file: str,
) -> FileRecord:
    """`dcp.save` of the tensors in `layout` (under `key` when given) into `work`; `produce(name)`
    materialises one output tensor when DCP writes it. Returns the data file's record."""
    placeholders = {n: torch.empty(shape, dtype=dtype, device="meta") for n, dtype, shape in layout}
    state: dict[str, Any] = {key: placeholders} if key else dict(placeholders)
    planned = {n: (dtype, shape) for n, dtype, shape in layout}

    def checked(name: str) -> torch.Tensor:
        tensor = produce(name)
        dtype, shape = planned[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise FormatError(
                f"{name}: produced {tensor.dtype} {list(tensor.shape)}, planned {dtype}"
            )
        return tensor

    files = _LocationFileSystem(work)
    writer = _Writer(files)
    with warnings.catch_warnings():  # one process on purpose: not worth a warning
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        planner = _StreamingPlanner(checked)
        try:
            dcp_save(state, storage_writer=writer, planner=planner, no_dist=True)
        finally:
            planner.release()
    written = set(files.records) - {METADATA}
    if written != {data_file}:
        raise FormatError(f"{work.url}: DCP wrote {sorted(written)}, expected {data_file}")
    return files.records[data_file]


def one_buffer(layout: Layout) -> Callable[[torch.dtype, tuple[int, ...]], torch.Tensor]:
    """Tensors for `write_dcp`'s `produce`, each a view of one buffer the size of the largest,
    with a storage of exactly its own bytes (else DCP copies it). Valid until the next is
    taken, which is when DCP has written it. Fresh memory for every tensor instead costs a page
    fault per 4 KiB: measured here at 3-4 s/GB, as much as the rest of the conversion."""
    largest = max((math.prod(shape) * itemsize(dtype) for _, dtype, shape in layout), default=0)
    memory = torch.empty(largest, dtype=torch.uint8).numpy()

    def empty(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape)
        if not count:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(memory, dtype=dtype, count=count).reshape(shape)

    return empty


def metadata_record(work: Location) -> FileRecord:
    """The `.metadata` file, as the manifest lists it."""
    return hash_file(work, METADATA)


def saved_fqns(work: Location) -> set[str]:
    """The fully qualified names the written `.metadata` holds (read back by the allow-listed
    unpickler, like every DCP source), to check the top key and the names exactly."""
    meta = restricted_load(work.read_bytes(METADATA), work.file(METADATA), DCP_METADATA)
    return {str(fqn) for fqn in (meta.field("state_dict_metadata") or {})}


class _StreamingPlanner(DefaultSavePlanner):
    """DCP's default save planner; a tensor's data is produced when DCP asks for it.

    DCP's file writer keeps a reference to every tensor it has written (for its safetensors
    format, even when it writes torch.save blobs), so the tensors would pile up into the whole
    state dict. DCP asks for the next tensor only once the previous one is in the file (the
    serial loader: `_Writer` turns off copying ahead), so the previous tensor's memory is given
    back then: what DCP still holds is an empty storage."""

    def __init__(self, produce: Callable[[str], torch.Tensor]) -> None:
        super().__init__()
        self._produce = produce
        self._written: torch.Tensor | None = None

    def lookup_object(self, index: MetadataIndex) -> Any:
        self.release()
        # The flattened name maps to its path in the (nested) state dict: (key, name) or (name,).
        path = self.mappings.get(index.fqn, (index.fqn,))
        self._written = self._produce(str(path[-1]))
        return self._written

    def release(self) -> None:
        """The last tensor's memory (unless it is a view of a buffer that `produce` reuses)."""
        if self._written is not None and self._written.untyped_storage().resizable():
            self._written.untyped_storage().resize_(0)
        self._written = None


class _Writer(FileSystemWriter):
    """DCP's FileSystemWriter on the work directory: one file, one thread, no fsync (the
    publish step makes the output durable and visible in one step)."""

    def __init__(self, files: _LocationFileSystem) -> None:
        # per_thread_copy_ahead=0: the serial loader, one tensor asked for at a time, also
        # where CUDA is present (else DCP copies up to 10 MB of tensors ahead).
        super().__init__(".", single_file_per_rank=True, sync_files=False, per_thread_copy_ahead=0)
        self.fs = files  # type: ignore[assignment]  # DCP's seam: any FileSystemBase
        self.path = "."

    def storage_meta(self) -> StorageMeta | None:
        return None  # no path, no random save id: same conversion, same bytes


class _LocationFileSystem(FileSystemBase):
    """DCP's file-system seam over a `Location`: paths are relative to it."""

    def __init__(self, root: Location) -> None:
        self.root = root
        self.records: dict[str, FileRecord] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        if mode != "wb":
            raise FormatError(f"{self.root.file(str(path))}: DCP asked to open it for {mode!r}")
        name = _relative(path)
        with self.root.writing(name) as handle:
            stream = HashingStream(handle)
            yield stream
        self.records[name] = stream.record(name)

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return _relative(posixpath.join(str(path), suffix))

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        old, new = _relative(path), _relative(new_path)
        if self.root.is_local:
            os.replace(self.root.file(old), self.root.file(new))
        else:
            self.root.fs.mv(self.root.file(old), self.root.file(new))
        record = self.records.pop(old)
        self.records[new] = FileRecord(new, record.size_bytes, record.sha256)

    def init_path(self, path: str | os.PathLike[str]) -> str:
        return _relative(path)

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        """Files are created with their directories."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # only ever given as a writer, never chosen by a checkpoint id

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.root.exists(_relative(path))

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.root.remove(_relative(path))


def _relative(path: str | os.PathLike[str]) -> str:
    return posixpath.normpath(str(path))


def expected_fqns(names: Sequence[str], key: str | None) -> set[str]:
    """The flattened names `dcp.save` gives the output's tensors."""
    return {f"{key}.{n}" if key else n for n in names}
