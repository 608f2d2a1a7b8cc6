"""The allow-list: which globals a pickle may name, per kind of file, and their stand-ins.

One fragment per kind of file (`TENSORS`, `DCP_METADATA`, `DTENSOR`, `SHARDED_TENSOR`,
`DEEPSPEED`); a format passes the ones it reads to unpickle.py's `restricted_load`, and a
global in none of them is refused with `UnsafeFileError`. Each maps (module, name) to an
immutable stand-in (unpickle_standins.py) or a checked callable (unpickle_rebuild.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from ckpt_core.dtypes import TORCH_DTYPES
from ckpt_core.formats.unpickle_rebuild import (
    DeviceMesh,
    DTensor,
    DTensorSpec,
    LocalShard,
    Partial,
    Replicate,
    Shard,
    ShardedTensor,
    ShardMetadata,
    StridedShard,
    TensorType,
    WrapperArgs,
    frozenset_of,
    layout_name,
    list_of,
    parameter_data,
    path_text,
    rebuild_from_type_v2,
    rebuild_tensor,
    rebuild_tensor_v3,
    set_of,
    sharded_tensor_getattr,
    torch_device,
    torch_size,
    tuple_of,
    zero_stage_enum,
)
from ckpt_core.formats.unpickle_standins import Call, StorageType, stand_in

__all__ = [
    "DCP_CLASSES",
    "DCP_METADATA",
    "DEEPSPEED",
    "DTENSOR",
    "SHARDED_TENSOR",
    "TENSORS",
    "Fragment",
]

Fragment = Mapping[tuple[str, str], Any]  # (module, name) -> stand-in


# -- torch.save archives: tensors, storages, dtypes -----------------------------------------
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

_SIZE = Call(torch_size)
_LAYOUT_NAME = Call(layout_name)
_DTYPES: Fragment = {("torch", name): dtype for name, dtype in TORCH_DTYPES.items()}

TENSORS: Fragment = MappingProxyType(
    {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): Call(rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v3"): Call(rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): Call(parameter_data),
        ("torch._utils", "_rebuild_parameter_with_state"): Call(parameter_data),
        ("torch", "Size"): _SIZE,
        ("torch", "device"): Call(torch_device),
        ("builtins", "set"): Call(set_of),
        ("builtins", "frozenset"): Call(frozenset_of),
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
            ("pathlib", cls): Call(path_text)
            for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
        },
        **_DTYPES,
    }
)


# -- DTensors (FSDP2 and tensor-parallel rank files), FSDP1 ShardedTensors (BAGEL) ----------
_REBUILD_FROM_TYPE = Call(rebuild_from_type_v2)
_ST = "torch.distributed._shard.sharded_tensor"
# The globals FSDP1 ShardedTensor pickles name (torch 2.13), beside the DTensor rebuild.
SHARDED_TENSOR: Fragment = MappingProxyType(
    {
        ("torch._tensor", "_rebuild_from_type_v2"): _REBUILD_FROM_TYPE,
        ("torch._utils", "_rebuild_wrapper_subclass"): WrapperArgs,
        ("torch.serialization", "_get_layout"): _LAYOUT_NAME,
        (f"{_ST}.api", "ShardedTensor"): ShardedTensor,
        (f"{_ST}.shard", "Shard"): LocalShard,
        ("torch.distributed._shard.metadata", "ShardMetadata"): ShardMetadata,
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
        ("builtins", "getattr"): Call(sharded_tensor_getattr),
    }
)
_TP = "torch.distributed.tensor.placement_types"
_SPEC = "torch.distributed.tensor._dtensor_spec"
_LAYOUT = "torch.distributed._mesh_layout"
# The globals DTensor pickles name (as seen in FSDP2 files written by torch 2.13).
DTENSOR: Fragment = MappingProxyType(
    {
        ("torch._tensor", "_rebuild_from_type_v2"): _REBUILD_FROM_TYPE,
        ("torch._utils", "_rebuild_wrapper_subclass"): WrapperArgs,
        ("torch.serialization", "_get_layout"): _LAYOUT_NAME,
        ("torch.distributed.tensor", "DTensor"): DTensor,
        ("torch.distributed.tensor._api", "DTensor"): DTensor,  # where the class is defined
        (_SPEC, "DTensorSpec"): DTensorSpec,
        (_SPEC, "TensorMeta"): stand_in("TensorMeta"),
        (_SPEC, "ShardOrderEntry"): stand_in("ShardOrderEntry"),
        (_TP, "Shard"): Shard,
        (_TP, "_StridedShard"): StridedShard,
        (_TP, "Replicate"): Replicate,
        (_TP, "Partial"): Partial,
        ("torch.distributed.device_mesh", "DeviceMesh"): DeviceMesh,
        (_LAYOUT, "_MeshLayout"): stand_in("_MeshLayout"),
        (_LAYOUT, "_FlatLayout"): stand_in("_FlatLayout"),
        # Plain constructors, allowed in tensor-parallel rank files from the start.
        ("builtins", "tuple"): Call(tuple_of),
        ("builtins", "list"): Call(list_of),
    }
)


# -- DeepSpeed ZeRO partitions and model states ---------------------------------------------
_LOSS_SCALER = "deepspeed.runtime.fp16.loss_scaler"
DEEPSPEED: Fragment = MappingProxyType(
    {
        (_LOSS_SCALER, "LossScaler"): stand_in("LossScaler"),
        (_LOSS_SCALER, "DynamicLossScaler"): stand_in("DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"): Call(zero_stage_enum),
        ("deepspeed.utils.tensor_fragment", "fragment_address"): stand_in("fragment_address"),
        ("argparse", "Namespace"): stand_in("Namespace"),
        ("torch._tensor", "_rebuild_from_type_v2"): _REBUILD_FROM_TYPE,
        ("torch", "Tensor"): TensorType,
        ("torch.nn.parameter", "Parameter"): TensorType,
    }
)
