"""The seam every format implements: a lazy index of tensors, read one at a time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

import torch

from ckpt_core.dtypes import Sized
from ckpt_core.errors import UnknownTensorError
from ckpt_core.io.storage import Location

__all__ = ["Format", "OpenOptions", "Reader", "SourceFacts", "TensorInfo", "lookup"]


@dataclass(frozen=True)
class TensorInfo(Sized):
    """What is known of a tensor without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OpenOptions:
    """Per-format reading options; formats ignore what does not concern them."""

    tag: str | None = None  # DeepSpeed: checkpoint tag instead of `latest`
    exclude_frozen: bool = False  # DeepSpeed: leave frozen parameters out
    base: str | None = None  # URL of a base HF model dir (config for strict key checks, TP roles)
    parallel_size: int | None = None  # tensor-parallel rank files: expected rank count
    allow_missing: tuple[str, ...] = ()  # fnmatch patterns of model keys allowed to be absent


@dataclass
class SourceFacts:
    """What a reader found out about its input, for the manifest and the report."""

    format: str
    files: list[str]  # relative paths of the files the tensors come from
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Reader(Protocol):
    """An opened checkpoint. Readers are thread-safe: `read` may run in parallel."""

    root: Location

    def index(self) -> Mapping[str, TensorInfo]:
        """Every tensor, in the checkpoint's own order; no tensor data is read."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """Materialise one tensor on the CPU, contiguous, in its stored dtype; a name the index
        does not hold raises `UnknownTensorError` (see `lookup`)."""
        ...

    def facts(self) -> SourceFacts: ...

    def asset_dirs(self) -> list[Location]:
        """Directories to look in for config/tokenizer/processor files, best first."""
        ...


class Format(Protocol):
    """One on-disk layout: recognises it and opens it."""

    name: str

    def detect(self, root: Location) -> bool:
        """Cheap: a listing and at most a few small reads."""
        ...

    def open(self, root: Location, options: OpenOptions) -> Reader: ...


T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, where: str) -> T:
    """`table[name]`, or the one error every reader raises for a name its index does not hold."""
    try:
        return table[name]
    except KeyError:
        raise UnknownTensorError(f"{where}: no tensor {name!r} in this checkpoint") from None
