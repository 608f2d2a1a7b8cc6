"""DeepSpeed without ZeRO (stage 0, bf16/fp16 training): `module` in
mp_rank_00_model_states.pt holds every weight in full, in the 16-bit training dtype.

A ZeRO checkpoint whose optimizer partitions are missing looks the same from its file names;
its `ds_config` (and the `param_shapes` ZeRO records) tell the two apart, so such a checkpoint
is refused rather than read as stage 0 (its `module` would lack the partitioned weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_core.errors import FormatError, clip
from ckpt_core.formats.deepspeed_layout import MODEL_RE, open_states, rank_files, tag_file
from ckpt_core.formats.torchzip import LazyTensor
from ckpt_core.io.storage import Location

__all__ = ["Stage0", "configured_stage", "read_stage0"]

_MODEL_FILES = "model states (*_model_states.pt)"


@dataclass(frozen=True)
class Stage0:
    """What a stage 0 checkpoint holds: its one file, world size, weights and notes."""

    file: str  # relative to the reader's root
    world: int
    module: dict[str, LazyTensor]
    notes: list[str]


def configured_stage(root: Location, tag_dir: str, names: list[str], where: str) -> int | None:
    """The ZeRO stage `ds_config` in mp_rank_00_model_states.pt names (None if it says none)."""
    model = rank_files(names, MODEL_RE, _MODEL_FILES, where)
    state = open_states(root, tag_file(tag_dir, model[min(model)])).obj
    config = state.get("ds_config") if isinstance(state, dict) else None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0 if config else None
    return stage if isinstance(stage, int) else None


def read_stage0(
    root: Location, tag_dir: str, names: list[str], *, where: str, tag: str, why: str
) -> Stage0:
    """The stage 0 checkpoint in the tag directory (`names` its files, `where` its path), or
    FormatError; `why` says why it is read as stage 0 (no ZeRO partitions)."""
    model = rank_files(names, MODEL_RE, _MODEL_FILES, where)
    file_where = f"{where}/{model[min(model)]}"
    stage = configured_stage(root, tag_dir, names, where)
    if set(model) != {0} or stage not in (0, None):
        raise FormatError(
            f"{file_where}: a ZeRO stage {stage} checkpoint ({len(model)} model states files) "
            f"but {why}: the optimizer partitions that hold its weights are missing; "
            "use a complete checkpoint"
        )
    state = open_states(root, tag_file(tag_dir, model[0])).obj
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict) or state.get("param_shapes"):
        raise FormatError(
            f"{file_where}: {why}, and no full `module` state dict without ZeRO param_shapes: "
            "not a DeepSpeed stage 0 checkpoint ckptflow can read"
        )
    world = int(state.get("dp_world_size") or 1)
    tensors = {str(name): value for name, value in module.items() if isinstance(value, LazyTensor)}
    if not tensors:
        raise FormatError(f"{file_where}: `module` holds no tensors")
    skipped = sorted(str(n) for n, v in module.items() if not isinstance(v, LazyTensor))
    notes = [
        f"DeepSpeed without ZeRO (stage 0), tag {tag}, data-parallel world size "
        f"{world}, written by deepspeed {state.get('ds_version', '?')}: {why}",
        "weights are the module's own, in its training dtype, from "
        f"{model[0]}['module'] (fp32 master copies in the optimizer state are not read)",
    ] + ([f"ignored non-tensor module entries: {clip(skipped)}"] if skipped else [])
    return Stage0(tag_file(tag_dir, model[0]), world, tensors, notes)
