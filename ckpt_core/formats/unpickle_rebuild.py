"""The allow-listed callables behind unpickle.py's stand-ins, each checking its arguments.

A pickle calls what it names with arguments it builds, so every callable here takes only the
argument types real files pass (a bare `str` or `tuple` would expand whatever object a pickle
hands it: gigabytes from a few KB) and refuses anything else with `FormatError` naming the
file. Each is called as `fn(load, *args)` through a `Call` stand-in bound to the running load.
Tensor rebuilds become lazy tensors of that load; DTensor and ShardedTensor rebuilds become
plain records of their placements and local pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ckpt_core.dtypes import itemsize
from ckpt_core.errors import FormatError
from ckpt_core.formats.unpickle_standins import (
    Load,
    Recorded,
    StorageRef,
    TensorRef,
    short_repr,
    stand_in,
)

if TYPE_CHECKING:
    from ckpt_core.formats.torchzip import LazyTensor  # torchzip imports the unpickle modules

__all__ = [
    "DTensor",
    "DTensorRef",
    "DTensorSpec",
    "DeviceMesh",
    "LocalShard",
    "Partial",
    "Replicate",
    "Shard",
    "ShardMetadata",
    "ShardedTensor",
    "ShardedTensorRef",
    "StridedShard",
    "TensorType",
    "WrapperArgs",
    "frozenset_of",
    "layout_name",
    "list_of",
    "parameter_data",
    "path_text",
    "rebuild_from_type_v2",
    "rebuild_tensor",
    "rebuild_tensor_v3",
    "set_of",
    "sharded_tensor_getattr",
    "torch_device",
    "torch_size",
    "tuple_of",
    "zero_stage_enum",
]


# -- tensors and plain constructors ---------------------------------------------------------
def _ints(load: Load, value: Any, what: str) -> tuple[int, ...]:
    """A shape or stride: a short tuple/list of plain ints, nothing else (no nested objects to
    expand, no bools or floats)."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) > _MAX_DIMS
        or not all(type(v) is int for v in value)
    ):
        raise FormatError(f"{load.where}: tensor {what} is not a list of ints: {short_repr(value)}")
    return tuple(value)


def _int(load: Load, value: Any, what: str) -> int:
    if type(value) is not int:
        raise FormatError(f"{load.where}: tensor {what} is not an int: {short_repr(value)}")
    return value


_MAX_DIMS = 64  # torch's own limit on a tensor's dimensions


def rebuild_tensor(
    load: Load, storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise FormatError(f"{load.where}: tensor without a storage record")
    return load.tensor(
        storage,
        _int(load, storage_offset, "storage offset"),
        _ints(load, size, "shape"),
        _ints(load, stride, "stride"),
    )


def rebuild_tensor_v3(
    load: Load,
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    _requires_grad: Any,
    _hooks: Any,
    dtype: torch.dtype,
    *_: Any,
) -> TensorRef:
    # v3 names the dtype itself and an untyped (byte) storage: re-type the storage record.
    if not isinstance(storage, StorageRef) or not isinstance(dtype, torch.dtype):
        raise FormatError(f"{load.where}: tensor without a storage record or dtype")
    typed = StorageRef(
        storage.key, dtype, storage.numel * itemsize(storage.dtype) // itemsize(dtype)
    )
    return rebuild_tensor(load, typed, storage_offset, size, stride)


def parameter_data(_load: Load, data: Any, *_: Any) -> Any:
    """`_rebuild_parameter(data, ...)`: a Parameter is its data."""
    return data


# Allow-listed constructors take only the argument types real files pass: a bare `str` or
# `tuple` would expand whatever object a pickle hands it (gigabytes from a few KB).
def torch_size(load: Load, dims: Any = ()) -> tuple[int, ...]:
    """`torch.Size(dims)`: a tuple of ints."""
    return _ints(load, dims, "size")


def torch_device(load: Load, kind: Any, index: Any = None) -> str:
    """`torch.device("cuda", 0)` or `torch.device("cuda:0")`: only its text is kept."""
    if type(kind) is not str or len(kind) > 64 or not (index is None or type(index) is int):
        raise FormatError(
            f"{load.where}: torch.device({short_repr(kind)}, {short_repr(index)}) is not a device"
        )
    return kind if index is None else f"{kind}:{index}"


def layout_name(load: Load, name: Any) -> str:
    """`torch.serialization._get_layout("torch.strided")`."""
    if type(name) is not str or len(name) > 64:
        raise FormatError(f"{load.where}: layout {short_repr(name)} is not a layout name")
    return name


def _scalar(value: Any) -> bool:
    return value is None or type(value) in (str, int, float, bool, bytes)


def set_of(load: Load, items: Any = ()) -> set[Any]:
    """`set(items)` of a list/tuple of scalars (hashing nested tuples can take minutes)."""
    if not isinstance(items, (list, tuple)) or not all(_scalar(v) for v in items):
        raise FormatError(f"{load.where}: a set of non-scalar items: {short_repr(items)}")
    return set(items)


def frozenset_of(load: Load, items: Any = ()) -> frozenset[Any]:
    return frozenset(set_of(load, items))


def tuple_of(load: Load, items: Any = ()) -> tuple[Any, ...]:
    if not isinstance(items, (list, tuple)):
        raise FormatError(f"{load.where}: tuple() of {short_repr(items)}")
    return tuple(items)


def list_of(load: Load, items: Any = ()) -> list[Any]:
    if not isinstance(items, (list, tuple)):
        raise FormatError(f"{load.where}: list() of {short_repr(items)}")
    return list(items)


def path_text(load: Load, *parts: Any) -> str:
    """StorageMeta.checkpoint_id is a pathlib path: only its text is of interest."""
    if not all(type(p) is str for p in parts):
        raise FormatError(f"{load.where}: a path of non-text parts: {short_repr(parts)}")
    return "/".join(parts)


# -- DTensors (FSDP2 and tensor-parallel rank files) ----------------------------------------
Shard = stand_in("Shard")
StridedShard = stand_in("_StridedShard")
Replicate = stand_in("Replicate")
Partial = stand_in("Partial")
DeviceMesh = stand_in("DeviceMesh")
DTensorSpec = stand_in("DTensorSpec")
DTensor = stand_in("DTensor")  # only ever the `new_type` of a rebuild
WrapperArgs = stand_in("_rebuild_wrapper_subclass")  # records (cls, dtype, size, ...)
TensorType = stand_in("Tensor")  # torch.Tensor / Parameter as the `new_type` of a rebuild


@dataclass
class DTensorRef:
    """A DTensor: its placements, mesh coordinate, global shape and the local piece."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    local: LazyTensor
    placements: tuple[Recorded, ...]
    coordinate: tuple[int, ...] | None
    mesh_shape: tuple[int, ...] | None


def rebuild_from_type_v2(_load: Load, func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if new_type is TensorType:
        # A plain tensor or Parameter with Python state: the data is func(*args); its state
        # does not matter for weights.
        return func(*args)
    if func is WrapperArgs and new_type is ShardedTensor:
        return _sharded_tensor(_load, args, state)
    if func is not WrapperArgs or new_type is not DTensor:
        raise FormatError(
            f"unexpected tensor subclass rebuild {short_repr(func)} -> {short_repr(new_type)}"
        )
    dtype, size = args[1], args[2]
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__ state, __slots__ state)
        state = state[1]
    if not isinstance(state, dict) or not isinstance(state.get("_local_tensor"), TensorRef):
        raise FormatError("a DTensor without a local tensor")
    spec = state.get("_spec")
    if not isinstance(spec, DTensorSpec):
        raise FormatError("a DTensor without a DTensorSpec")
    mesh = spec.field("mesh")
    coordinate = mesh_shape = None
    if isinstance(mesh, DeviceMesh):
        coord = mesh.field("_coordinate_on_dim")
        coordinate = tuple(int(c) for c in coord) if coord is not None else None
        layout = mesh.field("_layout")
        if isinstance(layout, Recorded) and layout.field("axes") is not None:
            mesh_shape = tuple(
                math.prod(int(v) for v in axis.field("shape") or ())
                for axis in layout.field("axes")
            )
    return DTensorRef(
        dtype=dtype,
        shape=tuple(int(x) for x in size),
        local=state["_local_tensor"],
        placements=tuple(spec.field("placements") or ()),
        coordinate=coordinate,
        mesh_shape=mesh_shape,
    )


# -- FSDP1 SHARDED_STATE_DICT values: ShardedTensor (BAGEL's per-rank fallback files) -------
ShardedTensor = stand_in("ShardedTensor")  # only ever the `new_type` of a rebuild
LocalShard = stand_in("Shard")  # sharded_tensor.shard.Shard: a local tensor and its metadata
ShardMetadata = stand_in("ShardMetadata")
_ProcessGroupState = stand_in("ProcessGroupState")


@dataclass
class ShardedTensorRef:
    """A ShardedTensor: global shape and this rank's local shards as ((offsets, sizes), piece)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    shards: tuple[tuple[tuple[tuple[int, ...], tuple[int, ...]], LazyTensor], ...]


def _sharded_tensor(load: Load, args: Any, state: Any) -> ShardedTensorRef:
    """`ShardedTensor.__getstate__` is (local_shards, metadata, pg_state, spec, init_rrefs)."""
    if not isinstance(args, tuple) or len(args) < 3 or not isinstance(args[1], torch.dtype):
        raise FormatError(f"{load.where}: a ShardedTensor without dtype and size")
    shape = _ints(load, args[2], "size")
    if not isinstance(state, tuple) or not state or not isinstance(state[0], list):
        raise FormatError(f"{load.where}: a ShardedTensor without its local shards")
    shards = []
    for shard in state[0]:
        tensor, meta = (
            (shard.field("tensor"), shard.field("metadata"))
            if isinstance(shard, LocalShard)
            else (None, None)
        )
        if not isinstance(tensor, TensorRef) or not isinstance(meta, ShardMetadata):
            raise FormatError(f"{load.where}: a ShardedTensor local shard without tensor/metadata")
        box = (
            _ints(load, meta.field("shard_offsets"), "shard offsets"),
            _ints(load, meta.field("shard_sizes"), "shard sizes"),
        )
        shards.append((box, tensor))
    return ShardedTensorRef(args[1], shape, tuple(shards))  # type: ignore[arg-type]


def sharded_tensor_getattr(load: Load, obj: Any, name: Any) -> Any:
    """`getattr(ShardedTensor, "ProcessGroupState")`, the one attribute such a pickle reads."""
    if obj is ShardedTensor and name == "ProcessGroupState":
        return _ProcessGroupState
    raise FormatError(f"{load.where}: refused getattr({short_repr(obj)}, {short_repr(name)})")


# -- DeepSpeed ------------------------------------------------------------------------------
def zero_stage_enum(_load: Load, value: Any) -> int:
    """`ZeroStageEnum(3)` pickles as a call with its value: keep the int."""
    return int(value)
