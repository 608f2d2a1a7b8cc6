"""DeepSpeed ZeRO on-disk layout: file names (which rank each file is, how it is opened), and
where each param lives.

Kept apart from the Format/Reader so the arithmetic (which rank holds which elements of
which parameter) is plain code over ints, mirroring DeepSpeed's `zero_to_fp32.py`.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckpt_core.errors import FormatError, clip
from ckpt_core.formats.torchzip import LazyTorchFile
from ckpt_core.formats.unpickle import DEEPSPEED
from ckpt_core.io.storage import Location

__all__ = [
    "DEEPSPEED_GLOBALS",
    "MODEL_RE",
    "OPTIM_RE",
    "ParamPlan",
    "Piece",
    "check_ranks",
    "natural_key",
    "open_states",
    "rank_files",
    "tag_file",
    "zero2_plans",
    "zero3_plans",
]

# The stand-ins for DeepSpeed's pickled classes live in unpickle.py; tests use this name.
DEEPSPEED_GLOBALS = DEEPSPEED

# -- file names -------------------------------------------------------------------------------

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


def natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def tag_file(tag_dir: str, name: str) -> str:
    """A file of the tag directory, relative to the reader's root ("" when root is the tag)."""
    return posixpath.join(tag_dir, name) if tag_dir else name


def open_states(root: Location, relative: str) -> LazyTorchFile:
    """A DeepSpeed `*_states.pt`, replayed with the DEEPSPEED stand-ins beside the tensor ones."""
    return LazyTorchFile(root, relative, extra_globals=DEEPSPEED)


def rank_files(names: list[str], pattern: Any, what: str, where: str) -> dict[int, str]:
    """Data-parallel rank -> file name of the `pattern` files among `names` (mp_rank_00 only)."""
    found: dict[int, str] = {}
    other_mp = sorted(n for n in names if (m := pattern.match(n)) and int(m.group(2)) != 0)
    if other_mp:
        raise FormatError(
            f"{where}: model-parallel files {clip(other_mp)}: tensor/pipeline-parallel "
            "DeepSpeed checkpoints are not supported (only mp_rank_00, like zero_to_fp32)"
        )
    for name in sorted(names, key=natural_key):
        match = pattern.match(name)
        if not match:
            continue
        rank = int(match.group(1) or 0)
        if rank in found:
            raise FormatError(
                f"{where}: two {what} files for data-parallel rank {rank}: "
                f"{found[rank]} and {name}; remove the stale one"
            )
        found[rank] = name
    if not found:
        raise FormatError(f"{where}: no {what} files found")
    return found


def check_ranks(files: dict[int, str], world: int, what: str, pattern: str, where: str) -> None:
    """Exactly ranks 0..world-1: a missing rank did not finish, an extra one is stale."""
    extra = sorted(name for rank, name in files.items() if rank >= world)
    missing = [rank for rank in range(world) if rank not in files]
    if extra:
        raise FormatError(
            f"{where}: {len(files)} {what} files but the checkpoint was written by "
            f"{world} ranks (partition_count); stale extra files: {clip(extra)} "
            "(left over from an older run with more ranks?): move them away"
        )
    if missing:
        raise FormatError(
            f"{where}: {what} files missing for data-parallel ranks "
            f"{clip([str(r) for r in missing])} of {world} (expected {pattern}); "
            "a rank did not finish saving: use a complete checkpoint"
        )


# -- where each parameter's elements are ------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """`count` elements of a parameter at element `start` of one rank's group `group`."""

    rank: int
    group: int
    start: int
    count: int


@dataclass
class ParamPlan:
    """Where a trainable parameter's fp32 master elements are, in order."""

    name: str
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def zero2_plans(
    param_shapes: Sequence[Mapping[str, tuple[int, ...]]],
    partition_numels: list[list[int]],
    paddings: list[list[int]] | None,
    where: str,
) -> list[ParamPlan]:
    """Stage 1/2: per group the rank partitions concatenated form one flat buffer in which
    params are consecutive (optionally each followed by its alignment padding).

    `partition_numels[rank][group]` is the element count of that rank's partition.
    """
    world = len(partition_numels)
    plans: list[ParamPlan] = []
    for group, shapes in enumerate(param_shapes):
        sizes = [partition_numels[rank][group] for rank in range(world)]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        group_pad = paddings[group] if paddings is not None else None
        if group_pad is not None and len(group_pad) != len(shapes):
            raise ValueError(
                f"{where}: group {group} has {len(shapes)} params but "
                f"{len(group_pad)} alignment paddings"
            )
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            plan = ParamPlan(name, tuple(shape))
            end = offset + plan.numel
            if end > bounds[-1]:
                raise ValueError(
                    f"{where}: param {name} needs elements [{offset}, {end}) of group {group} "
                    f"but the {world} partitions hold {bounds[-1]}"
                )
            for rank in range(world):
                lo, hi = max(offset, bounds[rank]), min(end, bounds[rank + 1])
                if lo < hi:
                    plan.pieces.append(Piece(rank, group, lo - bounds[rank], hi - lo))
            plans.append(plan)
            offset = end + (group_pad[index] if group_pad is not None else 0)
        # The tail of a group is alignment padding (to 2*world_size, as zero_to_fp32 checks).
        align = 2 * world
        if align * math.ceil(offset / align) != align * math.ceil(bounds[-1] / align):
            raise ValueError(
                f"{where}: group {group}: params use {offset} elements of {bounds[-1]}: "
                "param_shapes and the optimizer partitions do not match"
            )
    return plans


def zero3_plans(
    param_shapes: Sequence[Mapping[str, tuple[int, ...]]],
    group_numels: list[int],
    world: int,
    where: str,
) -> list[ParamPlan]:
    """Stage 3: every param has ceil(numel/world) elements on each rank, in param_shapes order
    across the concatenation of a rank's flat groups (`group_numels`, same on all ranks)."""
    bounds = [0]
    for size in group_numels:
        bounds.append(bounds[-1] + size)
    plans: list[ParamPlan] = []
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            plan = ParamPlan(name, tuple(shape))
            per_rank = math.ceil(plan.numel / world)
            remaining = plan.numel
            for rank in range(world):
                take = min(per_rank, remaining)  # the last ranks hold padding: trim it
                remaining -= take
                plan.pieces.extend(_span(rank, offset, take, bounds))
            plans.append(plan)
            offset += per_rank
    if offset != bounds[-1]:
        raise ValueError(
            f"{where}: params use {offset} elements per rank but each rank's flat groups hold "
            f"{bounds[-1]}: param_shapes and the optimizer partitions do not match"
        )
    return plans


def _span(rank: int, start: int, count: int, bounds: list[int]) -> list[Piece]:
    """Elements [start, start+count) of a rank's virtual concatenation of groups, per group."""
    pieces = []
    end = start + count
    for group in range(len(bounds) - 1):
        lo, hi = max(start, bounds[group]), min(end, bounds[group + 1])
        if lo < hi:
            pieces.append(Piece(rank, group, lo - bounds[group], hi - lo))
    return pieces
