"""The one safety boundary every pickle in ckpt_core goes through.

A pickle can name any importable callable and have it called, so pickles are replayed here by
an unpickler that knows only an allow-list of globals, each mapped to a harmless stand-in:
nothing of the classes a file names is imported or run. The allow-list comes in fragments,
one per kind of file (`TENSORS`, `DCP_METADATA`, `DTENSOR`, `DEEPSPEED`); a format says which
it reads and a global in none of them is refused with `UnsafeFileError`.

Stand-ins are shared by every load in the process, so a file must not be able to change one
(a BUILD opcode updates an object's `__dict__` or sets attributes, bypassing frozen
dataclasses, and would change what every later file reads). So each stand-in is immutable:
classes refuse attribute writes (`_FrozenClass`), objects have slots and refuse writes
(`_Frozen`), functions are wrapped in such an object, and dtypes and builtins are immutable
already. What a load builds (records, tensors) is its own.
"""

from __future__ import annotations

import io
import math
import pickle
import reprlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from ckpt_core.dtypes import TORCH_DTYPES, itemsize
from ckpt_core.errors import FormatError, UnsafeFileError

if TYPE_CHECKING:
    from ckpt_core.formats.torchzip import LazyTensor  # torchzip imports this module

__all__ = [
    "DCP_CLASSES",
    "DCP_METADATA",
    "DEEPSPEED",
    "DTENSOR",
    "SHARDED_TENSOR",
    "TENSORS",
    "DTensorRef",
    "Fragment",
    "Recorded",
    "Replicate",
    "Shard",
    "ShardedTensorRef",
    "StorageRef",
    "StorageType",
    "StridedShard",
    "TensorMaker",
    "TensorRef",
    "restricted_load",
    "short_repr",
    "stand_in",
]

Fragment = Mapping[tuple[str, str], Any]  # (module, name) -> stand-in

# A pickle of a few KB can build a structure whose full repr or str is gigabytes (a list of
# 1000 references to a list of 1000 references ...): messages show a bounded repr only.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def short_repr(obj: object) -> str:
    """A repr of at most a few hundred characters, whatever `obj` holds."""
    return _SHORT.repr(obj)[:200]


# -- immutability ---------------------------------------------------------------------------
def _refuse(self: object, name: str, *_: Any) -> NoReturn:
    raise TypeError(f"{self!r:.60} is a shared pickle stand-in and cannot be changed")


class _FrozenClass(type):
    """Metaclass of stand-in classes: BUILD on a class sets attributes; this refuses them."""

    __setattr__ = _refuse
    __delattr__ = _refuse


class _Frozen:
    """Base of stand-in objects: no `__dict__` for BUILD to update, no attribute writes."""

    __slots__ = ()
    __setattr__ = _refuse
    __delattr__ = _refuse


class _Call(_Frozen):
    """A function stand-in (a function's `__dict__` and `__defaults__` are writable). Called as
    `fn(load, *args)`: `find_class` hands out a copy bound to the running load."""

    __slots__ = ("_fn", "_load")
    _fn: Callable[..., Any]
    _load: _Unpickler | None

    def __init__(self, fn: Callable[..., Any], load: _Unpickler | None = None) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_load", load)

    def bound(self, load: _Unpickler) -> _Call:
        return _Call(self._fn, load)

    def __call__(self, *args: Any) -> Any:
        return self._fn(self._load, *args)

    def __repr__(self) -> str:
        return f"<stand-in {self._fn.__name__}>"


# -- records: stand-ins for the classes a pickle names ---------------------------------------
class Recorded(metaclass=_FrozenClass):
    """A pickled object's stand-in: keeps its constructor arguments and pickled state, runs
    nothing of the class it replaces."""

    args: tuple[Any, ...] = ()
    state: Any = None

    def __new__(cls, *args: Any, **_kwargs: Any) -> Recorded:
        # REDUCE calls the class, NEWOBJ only __new__: record the arguments either way.
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str, default: Any = None) -> Any:
        """A dataclass field from the pickled state (a dict, or (dict, slots) for slotted ones)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if isinstance(state, dict):
            return state.get(name, default)
        return default

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(args={short_repr(self.args)}, state={short_repr(self.state)})"
        )


def stand_in(name: str) -> type[Recorded]:
    """A Recorded subclass named like the class it replaces (for messages and isinstance)."""
    return type(name, (Recorded,), {})


# -- tensors: storages and rebuilds ---------------------------------------------------------
class StorageType(_Frozen):
    """Stands in for `torch.FloatStorage` & co. in a pickle: only its dtype matters."""

    __slots__ = ("dtype",)
    dtype: torch.dtype

    def __init__(self, dtype: torch.dtype) -> None:
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self) -> str:
        return f"StorageType(dtype={self.dtype})"


@dataclass(frozen=True)
class StorageRef:
    """A storage record of one load (made by `persistent_load`, so never shared)."""

    key: str
    dtype: torch.dtype
    numel: int


class TensorRef:
    """Base of what a tensor rebuild becomes (torchzip's LazyTensor): lets the DTensor stand-in
    check its local piece without importing torchzip."""

    __slots__ = ()


# Makes the lazy tensor of a rebuild: (storage, storage offset, shape, stride).
TensorMaker = Callable[[StorageRef, int, tuple[int, ...], tuple[int, ...]], TensorRef]

# The typed storages torch.save names (dtypes without one go through _rebuild_tensor_v3).
_STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


def _ints(load: _Unpickler, value: Any, what: str) -> tuple[int, ...]:
    """A shape or stride: a short tuple/list of plain ints, nothing else (no nested objects to
    expand, no bools or floats)."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) > _MAX_DIMS
        or not all(type(v) is int for v in value)
    ):
        raise FormatError(f"{load.where}: tensor {what} is not a list of ints: {short_repr(value)}")
    return tuple(value)


def _int(load: _Unpickler, value: Any, what: str) -> int:
    if type(value) is not int:
        raise FormatError(f"{load.where}: tensor {what} is not an int: {short_repr(value)}")
    return value


_MAX_DIMS = 64  # torch's own limit on a tensor's dimensions


def _rebuild_tensor(
    load: _Unpickler, storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise FormatError(f"{load.where}: tensor without a storage record")
    return load.tensor(
        storage,
        _int(load, storage_offset, "storage offset"),
        _ints(load, size, "shape"),
        _ints(load, stride, "stride"),
    )


def _rebuild_tensor_v3(
    load: _Unpickler,
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
    return _rebuild_tensor(load, typed, storage_offset, size, stride)


def _data(_load: _Unpickler, data: Any, *_: Any) -> Any:
    """`_rebuild_parameter(data, ...)`: a Parameter is its data."""
    return data


# Allow-listed constructors take only the argument types real files pass: a bare `str` or
# `tuple` would expand whatever object a pickle hands it (gigabytes from a few KB).
def _size(load: _Unpickler, dims: Any = ()) -> tuple[int, ...]:
    """`torch.Size(dims)`: a tuple of ints."""
    return _ints(load, dims, "size")


def _device(load: _Unpickler, kind: Any, index: Any = None) -> str:
    """`torch.device("cuda", 0)` or `torch.device("cuda:0")`: only its text is kept."""
    if type(kind) is not str or len(kind) > 64 or not (index is None or type(index) is int):
        raise FormatError(
            f"{load.where}: torch.device({short_repr(kind)}, {short_repr(index)}) is not a device"
        )
    return kind if index is None else f"{kind}:{index}"


def _layout(load: _Unpickler, name: Any) -> str:
    """`torch.serialization._get_layout("torch.strided")`."""
    if type(name) is not str or len(name) > 64:
        raise FormatError(f"{load.where}: layout {short_repr(name)} is not a layout name")
    return name


def _scalar(value: Any) -> bool:
    return value is None or type(value) in (str, int, float, bool, bytes)


def _set(load: _Unpickler, items: Any = ()) -> set[Any]:
    """`set(items)` of a list/tuple of scalars (hashing nested tuples can take minutes)."""
    if not isinstance(items, (list, tuple)) or not all(_scalar(v) for v in items):
        raise FormatError(f"{load.where}: a set of non-scalar items: {short_repr(items)}")
    return set(items)


def _frozenset(load: _Unpickler, items: Any = ()) -> frozenset[Any]:
    return frozenset(_set(load, items))


def _tuple(load: _Unpickler, items: Any = ()) -> tuple[Any, ...]:
    if not isinstance(items, (list, tuple)):
        raise FormatError(f"{load.where}: tuple() of {short_repr(items)}")
    return tuple(items)


def _list(load: _Unpickler, items: Any = ()) -> list[Any]:
    if not isinstance(items, (list, tuple)):
        raise FormatError(f"{load.where}: list() of {short_repr(items)}")
    return list(items)


_SIZE = _Call(_size)
_LAYOUT_NAME = _Call(_layout)
_DTYPES: Fragment = {("torch", name): dtype for name, dtype in TORCH_DTYPES.items()}

TENSORS: Fragment = MappingProxyType(
    {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v3"): _Call(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Call(_data),
        ("torch._utils", "_rebuild_parameter_with_state"): _Call(_data),
        ("torch", "Size"): _SIZE,
        ("torch", "device"): _Call(_device),
        ("builtins", "set"): _Call(_set),
        ("builtins", "frozenset"): _Call(_frozenset),
        **{("torch", name): StorageType(dtype) for name, dtype in _STORAGES.items()},
        **_DTYPES,
    }
)


# -- DCP `.metadata` ------------------------------------------------------------------------
# The real dataclasses run their own __setstate__, live in private modules that move between
# torch releases, and cost seconds to import: records stand in for all of them.
_DCP = "torch.distributed.checkpoint.metadata"
DCP_CLASSES = MappingProxyType(
    {
        name: stand_in(name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
            "_StorageInfo",
        )
    }
)


_PLANNER = "torch.distributed.checkpoint.planner"
_PLANNER_CLASSES = ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")


def _path(load: _Unpickler, *parts: Any) -> str:
    """StorageMeta.checkpoint_id is a pathlib path: only its text is of interest."""
    if not all(type(p) is str for p in parts):
        raise FormatError(f"{load.where}: a path of non-text parts: {short_repr(parts)}")
    return "/".join(parts)


DCP_METADATA: Fragment = MappingProxyType(
    {
        **{(_DCP, name): cls for name, cls in DCP_CLASSES.items() if name != "_StorageInfo"},
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): DCP_CLASSES["_StorageInfo"],
        # Megatron-core keeps its cached save plans in `.metadata` (`all_local_plans`): records.
        **{(_PLANNER, name): stand_in(name) for name in _PLANNER_CLASSES},
        ("torch", "Size"): _SIZE,
        ("torch.serialization", "_get_layout"): _LAYOUT_NAME,
        ("collections", "OrderedDict"): OrderedDict,
        **{
            ("pathlib", cls): _Call(_path)
            for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
        },
        **_DTYPES,
    }
)


# -- DTensors (FSDP2 and tensor-parallel rank files) ----------------------------------------
Shard = stand_in("Shard")
StridedShard = stand_in("_StridedShard")
Replicate = stand_in("Replicate")
_Partial = stand_in("Partial")
_DeviceMesh = stand_in("DeviceMesh")
_DTensorSpec = stand_in("DTensorSpec")
_DTensor = stand_in("DTensor")  # only ever the `new_type` of a rebuild
_WrapperArgs = stand_in("_rebuild_wrapper_subclass")  # records (cls, dtype, size, ...)
_TensorType = stand_in("Tensor")  # torch.Tensor / Parameter as the `new_type` of a rebuild


@dataclass
class DTensorRef:
    """A DTensor: its placements, mesh coordinate, global shape and the local piece."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    local: LazyTensor
    placements: tuple[Recorded, ...]
    coordinate: tuple[int, ...] | None
    mesh_shape: tuple[int, ...] | None


def _rebuild_from_type_v2(
    _load: _Unpickler, func: Any, new_type: Any, args: Any, state: Any
) -> Any:
    if new_type is _TensorType:
        # A plain tensor or Parameter with Python state: the data is func(*args); its state
        # does not matter for weights.
        return func(*args)
    if func is _WrapperArgs and new_type is _ShardedTensor:
        return _sharded_tensor(_load, args, state)
    if func is not _WrapperArgs or new_type is not _DTensor:
        raise FormatError(
            f"unexpected tensor subclass rebuild {short_repr(func)} -> {short_repr(new_type)}"
        )
    dtype, size = args[1], args[2]
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__ state, __slots__ state)
        state = state[1]
    if not isinstance(state, dict) or not isinstance(state.get("_local_tensor"), TensorRef):
        raise FormatError("a DTensor without a local tensor")
    spec = state.get("_spec")
    if not isinstance(spec, _DTensorSpec):
        raise FormatError("a DTensor without a DTensorSpec")
    mesh = spec.field("mesh")
    coordinate = mesh_shape = None
    if isinstance(mesh, _DeviceMesh):
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
_ShardedTensor = stand_in("ShardedTensor")  # only ever the `new_type` of a rebuild
_LocalShard = stand_in("Shard")  # sharded_tensor.shard.Shard: a local tensor and its metadata
_ShardMetadata = stand_in("ShardMetadata")
_ProcessGroupState = stand_in("ProcessGroupState")


@dataclass
class ShardedTensorRef:
    """A ShardedTensor: global shape and this rank's local shards as ((offsets, sizes), piece)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    shards: tuple[tuple[tuple[tuple[int, ...], tuple[int, ...]], LazyTensor], ...]


def _sharded_tensor(load: _Unpickler, args: Any, state: Any) -> ShardedTensorRef:
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
            if isinstance(shard, _LocalShard)
            else (None, None)
        )
        if not isinstance(tensor, TensorRef) or not isinstance(meta, _ShardMetadata):
            raise FormatError(f"{load.where}: a ShardedTensor local shard without tensor/metadata")
        box = (
            _ints(load, meta.field("shard_offsets"), "shard offsets"),
            _ints(load, meta.field("shard_sizes"), "shard sizes"),
        )
        shards.append((box, tensor))
    return ShardedTensorRef(args[1], shape, tuple(shards))  # type: ignore[arg-type]


def _getattr(load: _Unpickler, obj: Any, name: Any) -> Any:
    """`getattr(ShardedTensor, "ProcessGroupState")`, the one attribute such a pickle reads."""
    if obj is _ShardedTensor and name == "ProcessGroupState":
        return _ProcessGroupState
    raise FormatError(f"{load.where}: refused getattr({short_repr(obj)}, {short_repr(name)})")


_REBUILD_FROM_TYPE = _Call(_rebuild_from_type_v2)
_ST = "torch.distributed._shard.sharded_tensor"
# The globals FSDP1 ShardedTensor pickles name (torch 2.13), beside the DTensor rebuild.
SHARDED_TENSOR: Fragment = MappingProxyType(
    {
        ("torch._tensor", "_rebuild_from_type_v2"): _REBUILD_FROM_TYPE,
        ("torch._utils", "_rebuild_wrapper_subclass"): _WrapperArgs,
        ("torch.serialization", "_get_layout"): _LAYOUT_NAME,
        (f"{_ST}.api", "ShardedTensor"): _ShardedTensor,
        (f"{_ST}.shard", "Shard"): _LocalShard,
        ("torch.distributed._shard.metadata", "ShardMetadata"): _ShardMetadata,
        ("torch.distributed.remote_device", "_remote_device"): stand_in("_remote_device"),
        (f"{_ST}.metadata", "ShardedTensorMetadata"): stand_in("ShardedTensorMetadata"),
        (f"{_ST}.metadata", "TensorProperties"): stand_in("TensorProperties"),
        (f"{_ST}.metadata", "MEM_FORMAT_ENCODING"): stand_in("MEM_FORMAT_ENCODING"),
        ("torch.distributed._shard.sharding_spec.api", "EnumerableShardingSpec"): stand_in(
            "EnumerableShardingSpec"
        ),
        (
            "torch.distributed._shard.sharding_spec.chunk_sharding_spec",
            "ChunkShardingSpec",
        ): stand_in("ChunkShardingSpec"),
        ("builtins", "getattr"): _Call(_getattr),
    }
)
_TP = "torch.distributed.tensor.placement_types"
_SPEC = "torch.distributed.tensor._dtensor_spec"
_LAYOUT = "torch.distributed._mesh_layout"
# The globals DTensor pickles name (as seen in FSDP2 files written by torch 2.13).
DTENSOR: Fragment = MappingProxyType(
    {
        ("torch._tensor", "_rebuild_from_type_v2"): _REBUILD_FROM_TYPE,
        ("torch._utils", "_rebuild_wrapper_subclass"): _WrapperArgs,
        ("torch.serialization", "_get_layout"): _LAYOUT_NAME,
        ("torch.distributed.tensor", "DTensor"): _DTensor,
        ("torch.distributed.tensor._api", "DTensor"): _DTensor,  # where the class is defined
        (_SPEC, "DTensorSpec"): _DTensorSpec,
        (_SPEC, "TensorMeta"): stand_in("TensorMeta"),
        (_SPEC, "ShardOrderEntry"): stand_in("ShardOrderEntry"),
        (_TP, "Shard"): Shard,
        (_TP, "_StridedShard"): StridedShard,
        (_TP, "Replicate"): Replicate,
        (_TP, "Partial"): _Partial,
        ("torch.distributed.device_mesh", "DeviceMesh"): _DeviceMesh,
        (_LAYOUT, "_MeshLayout"): stand_in("_MeshLayout"),
        (_LAYOUT, "_FlatLayout"): stand_in("_FlatLayout"),
        # Plain constructors, allowed in tensor-parallel rank files from the start.
        ("builtins", "tuple"): _Call(_tuple),
        ("builtins", "list"): _Call(_list),
    }
)


# -- DeepSpeed ZeRO partitions and model states ---------------------------------------------
def _zero_stage_enum(_load: _Unpickler, value: Any) -> int:
    """`ZeroStageEnum(3)` pickles as a call with its value: keep the int."""
    return int(value)


_LOSS_SCALER = "deepspeed.runtime.fp16.loss_scaler"
DEEPSPEED: Fragment = MappingProxyType(
    {
        (_LOSS_SCALER, "LossScaler"): stand_in("LossScaler"),
        (_LOSS_SCALER, "DynamicLossScaler"): stand_in("DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"): _Call(_zero_stage_enum),
        ("deepspeed.utils.tensor_fragment", "fragment_address"): stand_in("fragment_address"),
        ("argparse", "Namespace"): stand_in("Namespace"),
        ("torch._tensor", "_rebuild_from_type_v2"): _REBUILD_FROM_TYPE,
        ("torch", "Tensor"): _TensorType,
        ("torch.nn.parameter", "Parameter"): _TensorType,
    }
)


# -- the unpickler --------------------------------------------------------------------------
_PY2_MODULES = {"__builtin__": "builtins"}


class _Unpickler(pickle.Unpickler):
    """One load: its file's name, allow-list and tensor maker (none for plain pickles)."""

    def __init__(
        self, data: bytes, where: str, allowed: Fragment, tensor: TensorMaker | None
    ) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where
        self._allowed = allowed
        self._tensor = tensor

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name Python 2's module (pickle's own fix_imports does the same).
        module = _PY2_MODULES.get(module, module)
        try:
            found = self._allowed[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"{self.where}: refused to unpickle global {module}.{name} (not on ckptflow's "
                "allow-list for this format; the file may run code when loaded: do not "
                "torch.load it with weights_only=False)"
            ) from None
        # A function stand-in is bound to this load, so it has no shared state to change.
        return found.bound(self) if isinstance(found, _Call) else found

    def persistent_load(self, pid: Any) -> Any:
        if self._tensor is None or not (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
        ):
            raise FormatError(f"{self.where}: unexpected persistent id {short_repr(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise FormatError(f"{self.where}: unknown storage type {short_repr(storage_type)}")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise FormatError(
                f"{self.where}: malformed storage record {short_repr(key)} of {short_repr(numel)} elements"
            )
        return StorageRef(key, storage_type.dtype, numel)

    def tensor(
        self, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> TensorRef:
        if self._tensor is None:
            raise FormatError(f"{self.where}: a tensor outside a torch.save archive")
        return self._tensor(storage, offset, shape, stride)


def restricted_load(
    data: bytes, where: str, allowed: Fragment, tensor: TensorMaker | None = None
) -> Any:
    """Replay a pickle with only the `allowed` globals (their stand-ins). `tensor` makes the
    lazy tensor of each tensor rebuild: given for a torch.save archive's data.pkl."""
    try:
        return _Unpickler(data, where, allowed, tensor).load()
    except (FormatError, UnsafeFileError):
        raise
    except (
        Exception
    ) as e:  # malformed, tampering or too deeply nested (RecursionError): say which file
        what = "data.pkl" if tensor else "the pickle"
        raise FormatError(
            f"{where}: cannot read {what} ({type(e).__name__}: {str(e)[:200]})"
        ) from e
