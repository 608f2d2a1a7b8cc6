"""FSDP per-rank state dict files: verl `model_world_size_{W}_rank_{r}.pt`, BAGEL `model_rank{r:05d}.pt`.

Each file is `torch.save(model.state_dict())` on one rank; under FSDP2 the values are DTensors.
The pickles are replayed with the `DTENSOR` fragment of stand-ins (unpickle.py: exactly the
classes a DTensor pickle names), so nothing runs; each DTensor becomes a `DTensorRef` (its
placements, mesh coordinate, global shape and a LazyTensor for the local piece). A tensor is merged by placement: Shard(d) pieces are placed at their offsets on
dim d (torch.chunk sizes, so an uneven last shard is handled), Replicate pieces must agree.
Plain tensors are replicated (every rank holds the whole tensor): they are compared, never
concatenated. FSDP1 `SHARDED_STATE_DICT` values (BAGEL's fallback files) are ShardedTensors,
replayed with the `SHARDED_TENSOR` fragment: each local shard carries its own offsets. Each merged tensor is materialised from its rank pieces by ranged reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.errors import FormatError, KeyMismatchError, clip
from ckpt_core.formats.boxes import Box, check_cover, fill_from, region
from ckpt_core.formats.protocol import OpenOptions, Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.torchzip import LazyTensor, LazyTorchFile, iter_leaves
from ckpt_core.formats.unpickle import (
    DTENSOR,
    SHARDED_TENSOR,
    DTensorRef,
    Replicate,
    Shard,
    ShardedTensorRef,
    StridedShard,
)
from ckpt_core.io.storage import Location

__all__ = [
    "BAGEL",
    "BAGEL_EMA",
    "FORMAT",
    "VERL",
    "FsdpRanksFormat",
    "FsdpRanksReader",
    "check_same_names",
    "rank_files",
]

VERL = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
BAGEL = re.compile(r"^model_rank(\d{5})\.pt$")
BAGEL_EMA = re.compile(r"^ema_rank(\d{5})\.pt$")


@dataclass(frozen=True)
class _Piece:
    rank: int
    box: Box | None  # None: a plain tensor, the whole of it
    local: LazyTensor


def _shard_box(name: str, ref: DTensorRef, rank: int, world: int) -> Box | None:
    """The region of the global tensor this rank's piece holds; None when replicated everywhere."""
    offsets = [0] * len(ref.shape)
    sizes = list(ref.shape)
    coordinate = ref.coordinate
    if coordinate is None and len(ref.placements) == 1:
        coordinate = (rank,)  # 1-D mesh over all ranks in rank order
    mesh_shape = ref.mesh_shape or ((world,) if len(ref.placements) == 1 else None)
    if coordinate is None or mesh_shape is None or len(coordinate) != len(ref.placements):
        raise FormatError(f"{name}: cannot tell which mesh position rank {rank} holds")
    sharded = False
    for placement, index, count in zip(ref.placements, coordinate, mesh_shape, strict=True):
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Shard) and not isinstance(placement, StridedShard):
            dim = int(placement.field("dim"))
            if dim < 0:
                dim += len(ref.shape)
            # torch.chunk semantics: ceil-sized pieces, the last ones short or empty.
            step = -(-sizes[dim] // count)
            start = min(step * index, sizes[dim])
            offsets[dim] += start
            sizes[dim] = min(sizes[dim] - start, step)
            sharded = True
            continue
        raise FormatError(
            f"{name}: placement {type(placement).__name__} cannot be merged offline "
            "(Partial holds unreduced sums; _StridedShard needs the full sharding plan)"
        )
    return (tuple(offsets), tuple(sizes)) if sharded else None


# FSDP2 values are DTensors; FSDP1 SHARDED_STATE_DICT values (BAGEL's fallback) ShardedTensors.
_RANK_FILE_GLOBALS = {**DTENSOR, **SHARDED_TENSOR}


def _sharded_pieces(
    where: str, name: str, values: Sequence[ShardedTensorRef]
) -> tuple[TensorInfo, list[_Piece]]:
    """A ShardedTensor's local shards on every rank, placed at their own offsets (a rank may
    hold none: torch.chunk gives fewer chunks than ranks for a short tensor)."""
    head = values[0]
    pieces = []
    for rank, ref in enumerate(values):
        if (ref.shape, ref.dtype) != (head.shape, head.dtype):
            raise FormatError(
                f"{where}: rank {rank} says {ref.dtype} {list(ref.shape)}, rank 0 says "
                f"{head.dtype} {list(head.shape)}"
            )
        for box, local in ref.shards:
            if tuple(local.shape) != box[1] or local.dtype != head.dtype:
                raise FormatError(
                    f"{where}: rank {rank} holds {local.dtype} {list(local.shape)} for a shard "
                    f"of size {list(box[1])}"
                )
            pieces.append(_Piece(rank, box, local))
    check_cover(where, head.shape, [p.box for p in pieces if p.box], duplicates=True)
    return TensorInfo(name, head.dtype, head.shape), pieces


class FsdpRanksReader:
    def __init__(self, root: Location, files: list[str], world: int, notes: list[str]) -> None:
        self.root = root
        self._files = files
        self._notes = notes
        self._pieces: dict[str, list[_Piece]] = {}
        self._infos: dict[str, TensorInfo] = {}
        per_rank: list[dict[str, Any]] = []
        for relative in files:
            lazy = LazyTorchFile(root, relative, extra_globals=_RANK_FILE_GLOBALS)
            if not isinstance(lazy.obj, Mapping):
                raise FormatError(
                    f"{lazy.where}: expected a state dict, found {type(lazy.obj).__name__}"
                )
            per_rank.append(dict(iter_leaves(lazy.obj, (LazyTensor, DTensorRef, ShardedTensorRef))))
        check_same_names(root, files, per_rank)
        for name in per_rank[0]:
            self._plan(name, [tensors[name] for tensors in per_rank], world)

    def _plan(self, name: str, values: list[Any], world: int) -> None:
        where = f"{self.root.url}: tensor {name}"
        kinds = {type(v) for v in values}
        if len(kinds) != 1:
            raise FormatError(
                f"{where} is stored differently across ranks (DTensor, ShardedTensor or plain "
                "tensor on some ranks, another kind on others)"
            )
        pieces: list[_Piece] = []
        if isinstance(values[0], ShardedTensorRef):
            info, pieces = _sharded_pieces(where, name, values)
        elif isinstance(values[0], DTensorRef):
            head: DTensorRef = values[0]
            for rank, ref in enumerate(values):
                if (ref.shape, ref.dtype) != (head.shape, head.dtype):
                    raise FormatError(
                        f"{where}: rank {rank} says {ref.dtype} {list(ref.shape)}, rank 0 "
                        f"says {head.dtype} {list(head.shape)}"
                    )
                box = _shard_box(where, ref, rank, world)
                if box is not None and tuple(ref.local.shape) != box[1]:
                    raise FormatError(
                        f"{where}: rank {rank} holds {list(ref.local.shape)}, its shard should "
                        f"be {list(box[1])}"
                    )
                pieces.append(_Piece(rank, box, ref.local))
            boxes = [p.box or ((0,) * len(head.shape), head.shape) for p in pieces]
            check_cover(where, head.shape, boxes, duplicates=True)
            info = TensorInfo(name, head.dtype, head.shape)
        else:
            plain: LazyTensor = values[0]
            for rank, lazy in enumerate(values):
                if (tuple(lazy.shape), lazy.dtype) != (tuple(plain.shape), plain.dtype):
                    raise FormatError(
                        f"{where}: a plain (replicated) tensor with different shapes or dtypes "
                        f"across ranks (rank {rank}: {lazy.dtype} {list(lazy.shape)}, rank 0: "
                        f"{plain.dtype} {list(plain.shape)})"
                    )
                pieces.append(_Piece(rank, None, lazy))
            info = TensorInfo(name, plain.dtype, tuple(plain.shape))
        self._pieces[name] = pieces
        self._infos[name] = info

    def index(self) -> Mapping[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str) -> torch.Tensor:
        info, pieces = lookup(self._infos, name, self.root.url), self._pieces[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        whole: torch.Tensor | None = None  # a replicated value, to compare the other ranks with
        filled: set[Box] = set()
        for piece in pieces:
            if piece.box is not None and piece.box not in filled:
                fill_from(out[region(piece.box)], piece.local)  # the common case: no copy
                filled.add(piece.box)
                continue
            if piece.box is None and whole is None:
                fill_from(out, piece.local)
                whole = out
                continue
            value = piece.local.materialize()  # a replica: compared, then dropped
            if piece.box is None:
                if whole is None or not torch.equal(whole, value):
                    raise FormatError(
                        f"{self.root.file(self._files[piece.rank])}: replicated tensor {name} "
                        "differs from rank 0's copy (ranks disagree: the checkpoint is inconsistent)"
                    )
                continue
            if not torch.equal(out[region(piece.box)], value):
                raise FormatError(
                    f"{self.root.file(self._files[piece.rank])}: replicated piece of {name} at "
                    f"{list(piece.box[0])} differs from another rank's copy"
                )
        return out

    def facts(self) -> SourceFacts:
        return SourceFacts("fsdp-ranks", list(self._files), list(self._notes))

    def asset_dirs(self) -> list[Location]:
        dirs = [self.root.child("huggingface")] if self.root.isdir("huggingface") else []
        return [*dirs, self.root]


def check_same_names(
    root: Location, files: Sequence[str], per_rank: Sequence[Mapping[str, Any]]
) -> None:
    """Every rank file holds the tensor names rank 0's does; the error names the file."""
    first = set(per_rank[0])
    for rank, tensors in enumerate(per_rank[1:], start=1):
        if set(tensors) != first:
            raise KeyMismatchError(
                f"{root.file(files[rank])}: tensor names differ from rank 0's "
                f"(only in rank {rank}: {clip(set(tensors) - first)}; "
                f"missing: {clip(first - set(tensors))})"
            )


def rank_files(root: Location) -> tuple[list[str], int, list[str]]:
    """The rank files in rank order, the world size, and notes; errors name what is wrong."""
    names = root.listdir()
    notes: list[str] = []
    verl = {n: m for n in names if (m := VERL.match(n))}
    if verl:
        sizes = {int(m.group(1)) for m in verl.values()}
        declared = None
        if root.exists("fsdp_config.json"):
            try:
                declared = json.loads(root.read_text("fsdp_config.json")).get("world_size")
            except (ValueError, AttributeError) as e:
                raise FormatError(f"{root.file('fsdp_config.json')}: not valid JSON ({e})") from e
        if len(sizes) > 1:
            raise FormatError(
                f"{root.url}: rank files of several world sizes {sorted(sizes)} "
                f"({clip(set(verl))}); remove the stale ones"
            )
        world = sizes.pop()
        if declared is not None and int(declared) != world:
            raise FormatError(
                f"{root.file('fsdp_config.json')}: world_size {declared} but the rank files say "
                f"{world}; the directory mixes two runs"
            )
        ranks = {int(m.group(2)): n for n, m in verl.items()}
        pattern = f"model_world_size_{world}_rank_{{}}.pt"
    else:
        bagel = {n: m for n in names if (m := BAGEL.match(n))}
        if not bagel:
            raise FormatError(f"{root.url}: no FSDP rank files found")
        ranks = {int(m.group(1)): n for n, m in bagel.items()}
        world = len(ranks)
        if root.exists("metadata.json"):
            try:
                declared = json.loads(root.read_text("metadata.json")).get("world_size")
            except (ValueError, AttributeError) as e:
                raise FormatError(f"{root.file('metadata.json')}: not valid JSON ({e})") from e
            if declared is not None:
                world = int(declared)
        else:
            world = max(ranks) + 1
        pattern = "model_rank{:05d}.pt"
        if any(BAGEL_EMA.match(n) for n in names):
            notes.append(
                "ema_rank*.pt files present: the EMA component is not read (main model only)"
            )
    stale = sorted(n for r, n in ranks.items() if r >= world)
    if stale:
        raise FormatError(
            f"{root.url}: rank file(s) {', '.join(stale)} beyond world size {world}; "
            "a stale file from another run? remove it"
        )
    missing = [pattern.format(r) for r in range(world) if r not in ranks]
    if missing:
        raise FormatError(
            f"{root.url}: missing rank file(s) {', '.join(missing)} of world size {world}"
        )
    return [ranks[r] for r in range(world)], world, notes


class FsdpRanksFormat:
    name = "fsdp-ranks"

    def detect(self, root: Location) -> bool:
        if not root.isdir():
            return False
        return any(VERL.match(n) or BAGEL.match(n) for n in root.listdir())

    def open(self, root: Location, options: OpenOptions) -> Reader:
        files, world, notes = rank_files(root)
        return FsdpRanksReader(root, files, world, notes)


FORMAT = FsdpRanksFormat()
