"""The one safety boundary every pickle in ckpt_core goes through.

A pickle can name any importable callable and have it called, so pickles are replayed here by
an unpickler that knows only an allow-list of globals, each mapped to a harmless stand-in:
nothing of the classes a file names is imported or run. The allow-list comes in fragments,
one per kind of file (`TENSORS`, `DCP_METADATA`, `DTENSOR`, `DEEPSPEED`); a format says which
it reads and a global in none of them is refused with `UnsafeFileError`.

This module is the one entry point: readers import everything from here. Its parts live
beside it: unpickle_standins (the immutable stand-ins: a file cannot change what a later file
reads), unpickle_rebuild (the allow-listed callables, each checking its arguments) and
unpickle_allow (the fragments: which global maps to which stand-in).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from ckpt_core.errors import FormatError, UnsafeFileError
from ckpt_core.formats.unpickle_allow import (
    DCP_CLASSES,
    DCP_METADATA,
    DEEPSPEED,
    DTENSOR,
    SHARDED_TENSOR,
    TENSORS,
    Fragment,
)
from ckpt_core.formats.unpickle_rebuild import (
    DTensorRef,
    Replicate,
    Shard,
    ShardedTensorRef,
    StridedShard,
)
from ckpt_core.formats.unpickle_standins import (
    Call,
    Recorded,
    StorageRef,
    StorageType,
    TensorMaker,
    TensorRef,
    short_repr,
    stand_in,
)

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
        return found.bound(self) if isinstance(found, Call) else found

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
