"""Boxes: which part of a tensor a DCP chunk or a rank's piece covers, the check that the
pieces tile the tensor exactly, and the copy of a piece into its place (straight from the file
when it can). Shared by the readers that assemble a tensor from pieces (dcp, fsdp_ranks,
megatron).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ckpt_core.errors import FormatError
from ckpt_core.formats.torchzip import LazyTensor

__all__ = ["Box", "check_cover", "fill_from", "region", "volume"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def check_cover(where: str, shape: Sequence[int], boxes: Sequence[Box], duplicates: bool) -> None:
    """The boxes tile `shape` exactly: inside it, no partial overlaps, no gaps.

    Identical boxes are an overlap unless `duplicates` (replicated pieces, compared elsewhere).
    """
    unique: list[Box] = []
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise FormatError(f"{where}: piece rank {len(offsets)} != tensor rank {len(shape)}")
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise FormatError(
                f"{where}: piece at {list(offsets)} of size {list(sizes)} lies outside {list(shape)}"
            )
        box = (tuple(offsets), tuple(sizes))
        if box in unique:
            if duplicates:
                continue
            raise FormatError(f"{where}: two pieces cover {list(offsets)} (size {list(sizes)})")
        for other in unique:
            if _intersects(box, other):
                raise FormatError(f"{where}: pieces at {list(box[0])} and {list(other[0])} overlap")
        unique.append(box)
    covered = sum(volume(sizes) for _, sizes in unique)
    if covered != volume(shape):
        raise FormatError(
            f"{where}: pieces cover {covered} of {volume(shape)} elements (a chunk or rank is missing)"
        )


def volume(sizes: Sequence[int]) -> int:
    count = 1
    for size in sizes:
        count *= size
    return count


def _intersects(a: Box, b: Box) -> bool:
    if volume(a[1]) == 0 or volume(b[1]) == 0:
        return False
    return all(
        ao < bo + bs and bo < ao + as_
        for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1], strict=True)
    )


def region(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(box[0], box[1], strict=True))


def fill_from(target: torch.Tensor, lazy: LazyTensor) -> None:
    """Copy a chunk into its place; straight from the file when both sides are contiguous
    (a Shard(0) chunk is a contiguous row block), saving an allocation and a copy."""
    if tuple(target.shape) != tuple(lazy.shape) or target.dtype != lazy.dtype:
        raise FormatError(
            f"{lazy.source.where}: piece is {lazy.dtype} {list(lazy.shape)}, its place in the "
            f"tensor is {target.dtype} {list(target.shape)}"
        )
    in_bounds = lazy.storage_offset + lazy.numel <= lazy.storage.numel
    if target.is_contiguous() and lazy.is_contiguous() and in_bounds and lazy.numel:
        start = lazy.source.record_offset(lazy.storage.key)
        flat = target.view(-1)  # a 0-dim tensor cannot be viewed as bytes; a 1-dim one can
        lazy.source.read_into(start + lazy.storage_offset * target.element_size(), flat)
    else:
        target.copy_(lazy.materialize())
