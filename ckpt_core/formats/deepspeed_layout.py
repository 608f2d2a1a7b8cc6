"""DeepSpeed ZeRO on-disk layout: file names, and where each param lives.

Kept apart from the Format/Reader so the arithmetic (which rank holds which elements of
which parameter) is plain code over ints, mirroring DeepSpeed's `zero_to_fp32.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckpt_core.formats.unpickle import DEEPSPEED

__all__ = [
    "DEEPSPEED_GLOBALS",
    "MODEL_RE",
    "OPTIM_RE",
    "ParamPlan",
    "Piece",
    "natural_key",
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
