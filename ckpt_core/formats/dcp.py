"""torch Distributed Checkpoint (DCP) directories: `.metadata` + `__{rank}_{n}.distcp` files.

`.metadata` is a pickled `Metadata`. It is replayed by the allow-listed unpickler with the
`DCP_METADATA` fragment, in which every DCP class it names is a stand-in that only records
its fields (`Recorded`, see unpickle.py). Each tensor is then assembled chunk by chunk: a
chunk is a torch.save blob at (relative_path, offset, length) inside a .distcp file, read
lazily by `LazyTorchFile` and copied into the output at its offsets, so one tensor (plus one
chunk) is in memory at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.dtypes import flat_buffer, itemsize
from ckpt_core.errors import FormatError
from ckpt_core.formats.boxes import Box, check_cover, fill_from, region, volume
from ckpt_core.formats.protocol import OpenOptions, Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.torchzip import LazyTensor, LazyTorchFile
from ckpt_core.formats.unpickle import (
    DCP_CLASSES,
    DCP_METADATA,
    Recorded,
    restricted_load,
    short_repr,
)
from ckpt_core.io.storage import Location, safe_relative, split_url

__all__ = [
    "FORMAT",
    "METADATA",
    "TRAINER_KEYS",
    "DcpFormat",
    "DcpReader",
]

METADATA = ".metadata"
# Top-level entries trainers save beside the model (torchtitan's CheckpointManager, accelerate,
# torch's own examples): not weights, so never converted.
TRAINER_KEYS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optim",
        "train_state",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "dataloader",
        "rng",
        "rng_state",
    }
)
# Model checkpoint directories accelerate writes beside `optimizer_0/`.
MODEL_DIRS = ("pytorch_model_fsdp",)


def _trainer_state(path: tuple[str, ...]) -> bool:
    """An entry nested under a trainer's top-level key (not a model tensor named like one)."""
    return len(path) > 1 and path[0] in TRAINER_KEYS


# -- the reader -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Chunk:
    box: Box
    relative: str
    offset: int
    length: int


@dataclass(frozen=True)
class _Entry:
    fqn: str  # name in the checkpoint, before stripping the top key
    info: TensorInfo
    chunks: tuple[_Chunk, ...]


class DcpReader:
    def __init__(self, root: Location) -> None:
        self.root = root
        self._blobs: dict[tuple[str, int], LazyTensor] = {}
        self._assembled = threading.local()  # read_range's whole tensor, when it needs one
        where = root.file(METADATA)
        meta = restricted_load(root.read_bytes(METADATA), where, DCP_METADATA)
        if not isinstance(meta, DCP_CLASSES["Metadata"]):
            raise FormatError(f"{where}: not a DCP Metadata pickle (found {type(meta).__name__})")
        self._notes: list[str] = []
        self._file_bytes: dict[str, int] = {}
        try:
            self._read_metadata(meta, where)
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            # A field of the wrong type (None for a size, a string for an offset, ...).
            raise FormatError(
                f"{where}: malformed DCP metadata ({type(e).__name__}: {str(e)[:200]})"
            ) from e
        files = {c.relative for e in self._entries.values() for c in e.chunks}
        self._files = [METADATA, *sorted(files)]

    def _read_metadata(self, meta: Recorded, where: str) -> None:
        tensors_md: Mapping[str, Any] = meta.field("state_dict_metadata") or {}
        storage: Mapping[Any, Any] = meta.field("storage_data") or {}
        planner: Mapping[str, Any] = meta.field("planner_data") or {}
        locations = self._storage_map(storage, where)
        names = self._names(list(tensors_md), planner)
        self._entries: dict[str, _Entry] = {}
        skipped_bytes: list[str] = []
        for fqn, md in tensors_md.items():
            if fqn not in names:
                continue
            if not isinstance(md, DCP_CLASSES["TensorStorageMetadata"]):
                skipped_bytes.append(fqn)
                continue
            entry = self._entry(fqn, names[fqn], md, locations, where)
            self._entries[entry.info.name] = entry
        if skipped_bytes:
            self._notes.append(
                f"ignored {len(skipped_bytes)} non-tensor (bytes) entries: "
                + ", ".join(sorted(skipped_bytes)[:8])
            )
        if not self._entries:
            raise FormatError(f"{where}: the checkpoint holds no tensors")

    @staticmethod
    def _storage_map(
        storage: Mapping[Any, Any], where: str
    ) -> dict[tuple[str, tuple[int, ...]], _Chunk]:
        found: dict[tuple[str, tuple[int, ...]], _Chunk] = {}
        for index, info in storage.items():
            if not isinstance(index, DCP_CLASSES["MetadataIndex"]) or not isinstance(
                info, DCP_CLASSES["_StorageInfo"]
            ):
                raise FormatError(f"{where}: unexpected storage_data entry {short_repr(index)}")
            if info.field("transform_descriptors"):
                raise FormatError(
                    f"{where}: {index.field('fqn')} is stored with transforms "
                    f"{info.field('transform_descriptors')} (e.g. compression), which ckptflow "
                    "does not read; save the checkpoint without storage extensions"
                )
            relative = safe_relative(str(info.field("relative_path")), where)
            offsets = tuple(int(x) for x in (index.field("offset") or ()))
            found[(str(index.field("fqn")), offsets)] = _Chunk(
                ((), ()), relative, int(info.field("offset")), int(info.field("length"))
            )
        return found

    def _names(self, fqns: list[str], planner: Mapping[str, Any]) -> dict[str, str]:
        """Checkpoint fqn -> reported name. A trainer's own state beside the model (torchtitan,
        accelerate: `optimizer`, `train_state`, ...) is left out; then a single top-level key
        (`model`) is stripped."""

        def path_of(fqn: str) -> tuple[str, ...]:
            path = planner.get(fqn)
            if isinstance(path, (tuple, list)) and path:
                return tuple(str(p) for p in path)
            head, _, rest = fqn.partition(".")
            return (head, rest) if rest else (head,)

        every = {fqn: path_of(fqn) for fqn in fqns}
        paths = {f: p for f, p in every.items() if not _trainer_state(p)}
        left_out = sorted({p[0] for f, p in every.items() if f not in paths})
        if left_out:
            counts = {top: sum(1 for p in every.values() if p[0] == top) for top in left_out}
            if not paths:
                raise FormatError(self._not_a_model(counts))
            self._notes.append(
                "left out the trainer's own state (not model weights): "
                + ", ".join(f"{top!r} ({n} entries)" for top, n in counts.items())
            )
        tops = sorted({p[0] for p in paths.values()})
        if len(tops) == 1 and all(len(p) > 1 for p in paths.values()):
            self._notes.append(f"stripped the single top-level key {tops[0]!r} from every name")
            return {fqn: ".".join(p[1:]) for fqn, p in paths.items()}
        if len(tops) > 1 and "model" in tops:
            self._notes.append(
                "read only the top-level key 'model' (stripped from names); ignored "
                + ", ".join(repr(t) for t in tops if t != "model")
            )
            return {
                fqn: ".".join(p[1:]) for fqn, p in paths.items() if p[0] == "model" and len(p) > 1
            }
        return {fqn: fqn for fqn in paths}

    def _not_a_model(self, counts: Mapping[str, int]) -> str:
        """Refusal of a DCP directory holding only trainer state (accelerate's `optimizer_0/`),
        naming the model checkpoint beside it when there is one."""
        what = ", ".join(f"{top!r} ({n} entries)" for top, n in counts.items())
        parent, name = split_url(self.root.url)
        try:
            siblings = [s for s in Location(parent).listdir() if s.startswith(MODEL_DIRS)]
        except OSError:
            siblings = []
        hint = (
            f"convert the model checkpoint beside it instead: {Location(parent).file(siblings[0])}"
            if siblings
            else "point ckptflow at the model's checkpoint directory"
        )
        return (
            f"{self.root.file(METADATA)}: {name} holds only {what}: this is optimizer/trainer "
            f"state, not a model; {hint}"
        )

    def _entry(
        self,
        fqn: str,
        name: str,
        md: Recorded,
        locations: Mapping[tuple[str, tuple[int, ...]], _Chunk],
        where: str,
    ) -> _Entry:
        props = md.field("properties")
        dtype = props.state[0] if props is not None and isinstance(props.state, tuple) else None
        if not isinstance(dtype, torch.dtype):
            dtype = props.field("dtype") if props is not None else None
        if not isinstance(dtype, torch.dtype):
            raise FormatError(f"{where}: tensor {fqn} has no dtype in its properties")
        shape = tuple(int(x) for x in md.field("size"))
        chunks = []
        for chunk_md in md.field("chunks") or ():
            offsets = tuple(int(x) for x in chunk_md.field("offsets"))
            sizes = tuple(int(x) for x in chunk_md.field("sizes"))
            try:
                loc = locations[(fqn, offsets)]
            except KeyError:
                raise FormatError(
                    f"{where}: tensor {fqn}: chunk at {list(offsets)} has no storage entry"
                ) from None
            chunk = _Chunk((offsets, sizes), loc.relative, loc.offset, loc.length)
            self._check_claim(f"{where}: tensor {fqn}", chunk, dtype)
            chunks.append(chunk)
        check_cover(f"{where}: tensor {fqn}", shape, [c.box for c in chunks], duplicates=False)
        return _Entry(fqn, TensorInfo(name, dtype, shape), tuple(chunks))

    def _check_claim(self, what: str, chunk: _Chunk, dtype: torch.dtype) -> None:
        """A chunk's bytes lie inside its file and hold what its sizes claim, so that no
        tensor is allocated beyond the bytes really there (a petabyte claim is refused here;
        check_cover then bounds the whole tensor by its chunks)."""
        file_bytes = self._file_bytes.get(chunk.relative)
        if file_bytes is None:
            if not self.root.exists(chunk.relative):
                raise FormatError(f"{what}: its file {chunk.relative} is missing")
            file_bytes = self._file_bytes[chunk.relative] = self.root.size(chunk.relative)
        offset, length = chunk.offset, chunk.length
        if offset < 0 or length < 0 or offset + length > file_bytes:
            raise FormatError(
                f"{what}: chunk at bytes [{offset}, {offset + length}) lies outside "
                f"{chunk.relative} ({file_bytes} bytes; truncated or corrupt)"
            )
        claimed = volume(chunk.box[1]) * itemsize(dtype)
        if claimed > length:
            raise FormatError(
                f"{what}: chunk at {list(chunk.box[0])} claims {list(chunk.box[1])} {dtype} "
                f"({claimed} bytes) but its storage entry holds {length} bytes "
                "(corrupt or hostile metadata)"
            )

    def index(self) -> Mapping[str, TensorInfo]:
        return {name: entry.info for name, entry in self._entries.items()}

    def read(self, name: str) -> torch.Tensor:
        entry = lookup(self._entries, name, self.root.url)
        out = torch.empty(entry.info.shape, dtype=entry.info.dtype)
        for chunk in entry.chunks:
            fill_from(out[region(chunk.box)], self._chunk_tensor(entry, chunk))
        return out

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements [start, start+count) in C order, 1-D. When every chunk is a block of whole
        rows (FSDP's Shard(0), and any unsharded tensor) each is a run of the flat tensor, read
        by byte range; otherwise the tensor is assembled whole once per thread, kept for the
        next range of the same tensor, and sliced."""
        entry = lookup(self._entries, name, self.root.url)
        if start < 0 or count < 0 or start + count > entry.info.numel:
            raise IndexError(f"{name}: elements [{start}, {start + count}) of {entry.info.numel}")
        out = flat_buffer(out, count, entry.info.dtype)
        runs = self._runs(entry)
        if runs is None:
            held = getattr(self._assembled, "held", None)
            if held is None or held[0] != name:
                held = self._assembled.held = (name, self.read(name).reshape(-1))
            return out.copy_(held[1][start : start + count])
        end = start + count
        for first, lazy in runs:
            lo, hi = max(start, first), min(end, first + lazy.numel)
            if lo < hi:
                lazy.read_range(lo - first, hi - lo, out[lo - start : hi - start])
        return out

    def _runs(self, entry: _Entry) -> list[tuple[int, LazyTensor]] | None:
        """(first flat element, chunk) per chunk when each chunk is a contiguous run of whole
        rows; None otherwise."""
        shape = entry.info.shape
        row = volume(shape[1:])
        runs = []
        for chunk in entry.chunks:
            offsets, sizes = chunk.box
            lazy = self._chunk_tensor(entry, chunk)
            if any(offsets[1:]) or sizes[1:] != shape[1:] or not lazy.is_contiguous():
                return None
            runs.append((offsets[0] * row if shape else 0, lazy))
        return runs

    def pieces(self, name: str) -> list[tuple[Box, LazyTensor]]:
        """Each chunk of a tensor: its box in the tensor and its bytes, read lazily (a format
        built on DCP reads parts of a tensor from them: Megatron's layer slices)."""
        entry = lookup(self._entries, name, self.root.url)
        return [(chunk.box, self._chunk_tensor(entry, chunk)) for chunk in entry.chunks]

    def _chunk_tensor(self, entry: _Entry, chunk: _Chunk) -> LazyTensor:
        """A chunk's torch.save blob, parsed once (its pickle names a tensor, nothing else)."""
        key = (chunk.relative, chunk.offset)
        found = self._blobs.get(key)
        if found is not None:
            return found
        blob = LazyTorchFile(self.root, chunk.relative, start=chunk.offset, length=chunk.length)
        lazy = blob.obj
        if not isinstance(lazy, LazyTensor):
            raise FormatError(f"{blob.where}: chunk of {entry.fqn} is not a tensor")
        if tuple(lazy.shape) != chunk.box[1] or lazy.dtype != entry.info.dtype:
            raise FormatError(
                f"{blob.where}: chunk of {entry.fqn} is {lazy.dtype} {list(lazy.shape)}, "
                f"metadata says {entry.info.dtype} {list(chunk.box[1])}"
            )
        self._blobs[key] = lazy
        return lazy

    def facts(self) -> SourceFacts:
        return SourceFacts("dcp", list(self._files), list(self._notes))

    def asset_dirs(self) -> list[Location]:
        return [self.root]


class DcpFormat:
    name = "dcp"

    def detect(self, root: Location) -> bool:
        return root.isdir() and root.exists(METADATA)

    def open(self, root: Location, options: OpenOptions) -> Reader:
        return DcpReader(root)


FORMAT = DcpFormat()
