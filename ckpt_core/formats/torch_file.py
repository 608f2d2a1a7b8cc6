"""A raw torch.save state dict: one .pth/.pt/.bin file, or a directory holding exactly one.

Bare (`{name: tensor}`) or wrapped (`{"model": sd}`, `{"module": sd}`, `{"state_dict": sd}`);
any dtype, including MiniMind-style fp16 files that store tied embed_tokens/lm_head twice.
The generic format: tried last, and it leaves HuggingFace directories (pytorch_model.bin,
safetensors) to the hf format. When a config is known (`OpenOptions.base`, or a config.json
beside the file) the keys are checked strictly against the model it describes, and tied
duplicates are dropped after checking that they really are equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt_core.errors import FormatError
from ckpt_core.formats.protocol import OpenOptions, Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.torchzip import LazyTensor, LazyTorchFile, iter_tensors
from ckpt_core.io.storage import Location, split_url

__all__ = [
    "FORMAT",
    "HF_NAMES",
    "SUFFIXES",
    "TorchFileFormat",
    "TorchFileReader",
    "WRAPPERS",
    "candidates",
    "unwrap",
]

SUFFIXES = (".pth", ".pt", ".bin")
WRAPPERS = ("model", "module", "state_dict")
# Names that belong to other formats even when alone in a directory.
HF_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors")


def candidates(root: Location) -> list[str]:
    names = root.listdir()
    if any(n in HF_NAMES or n.endswith(".safetensors") for n in names):
        return []
    return [n for n in names if n.endswith(SUFFIXES) and not root.isdir(n)]


def unwrap(obj: Any, where: str) -> tuple[dict[str, LazyTensor], list[str]]:
    """The state dict inside a torch.save object, flattened to dotted names, and notes."""
    if not isinstance(obj, Mapping):
        raise FormatError(f"{where}: expected a state dict, found a {type(obj).__name__}")
    notes: list[str] = []
    source: Mapping[str, Any] = obj
    for key in WRAPPERS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and iter_tensors(inner):
            source = inner
            others = sorted(str(k) for k in obj if k != key)
            notes.append(
                f"read the state dict under {key!r}"
                + (f"; ignored {', '.join(others[:8])}" if others else "")
            )
            break
    tensors = dict(iter_tensors(source))
    if not tensors:
        raise FormatError(f"{where}: no tensors found (keys: {', '.join(map(str, list(obj)[:8]))})")
    skipped = [str(k) for k, v in source.items() if not isinstance(v, (LazyTensor, Mapping))]
    if skipped:
        notes.append(f"ignored non-tensor entries: {', '.join(skipped[:8])}")
    return tensors, notes


class TorchFileReader:
    def __init__(self, directory: Location, name: str, options: OpenOptions) -> None:
        self.root = directory
        self._name = name
        lazy = LazyTorchFile(directory, name)
        self._where = lazy.where
        self._tensors, self._notes = unwrap(lazy.obj, lazy.where)

    def index(self) -> Mapping[str, TensorInfo]:
        return {n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return lookup(self._tensors, name, self._where).materialize()

    def facts(self) -> SourceFacts:
        return SourceFacts("torch-file", [self._name], list(self._notes))

    def asset_dirs(self) -> list[Location]:
        return [self.root]


class TorchFileFormat:
    name = "torch-file"

    def detect(self, root: Location) -> bool:
        if root.isdir():
            return len(candidates(root)) == 1
        return root.url.rstrip("/").endswith(SUFFIXES) and root.exists()

    def open(self, root: Location, options: OpenOptions) -> Reader:
        if not root.isdir():
            parent, name = split_url(root.url)
            directory = Location(parent)
            return TorchFileReader(directory, name, options)
        found = candidates(root)
        if len(found) != 1:
            raise FormatError(
                f"{root.url}: expected exactly one .pth/.pt/.bin state dict file, found "
                f"{', '.join(found) or 'none'}; pass the file itself"
            )
        return TorchFileReader(root, found[0], options)


FORMAT = TorchFileFormat()
