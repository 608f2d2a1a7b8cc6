"""The stand-ins the allow-listed unpickle (unpickle.py) hands out in place of real globals.

Stand-ins are shared by every load in the process, so a file must not be able to change one
(a BUILD opcode updates an object's `__dict__` or sets attributes, bypassing frozen
dataclasses, and would change what every later file reads). So each stand-in is immutable:
classes refuse attribute writes (`FrozenClass`), objects have slots and refuse writes
(`Frozen`), functions are wrapped in such an object (`Call`), and dtypes and builtins are
immutable already. What a load builds (records, tensors) is its own.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import torch

__all__ = [
    "Call",
    "Frozen",
    "FrozenClass",
    "Load",
    "Recorded",
    "StorageRef",
    "StorageType",
    "TensorMaker",
    "TensorRef",
    "short_repr",
    "stand_in",
]

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


class FrozenClass(type):
    """Metaclass of stand-in classes: BUILD on a class sets attributes; this refuses them."""

    __setattr__ = _refuse
    __delattr__ = _refuse


class Frozen:
    """Base of stand-in objects: no `__dict__` for BUILD to update, no attribute writes."""

    __slots__ = ()
    __setattr__ = _refuse
    __delattr__ = _refuse


class Load(Protocol):
    """What a function stand-in sees of the running load: its file's name (for messages) and
    its tensor maker."""

    where: str

    def tensor(
        self, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ) -> TensorRef: ...


class Call(Frozen):
    """A function stand-in (a function's `__dict__` and `__defaults__` are writable). Called as
    `fn(load, *args)`: `find_class` hands out a copy bound to the running load."""

    __slots__ = ("_fn", "_load")
    _fn: Callable[..., Any]
    _load: Load | None

    def __init__(self, fn: Callable[..., Any], load: Load | None = None) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_load", load)

    def bound(self, load: Load) -> Call:
        return Call(self._fn, load)

    def __call__(self, *args: Any) -> Any:
        return self._fn(self._load, *args)

    def __repr__(self) -> str:
        return f"<stand-in {self._fn.__name__}>"


# -- records: stand-ins for the classes a pickle names ---------------------------------------
class Recorded(metaclass=FrozenClass):
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


# -- tensors: storages and what a rebuild makes ---------------------------------------------
class StorageType(Frozen):
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
