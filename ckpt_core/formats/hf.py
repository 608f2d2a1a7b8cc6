"""HuggingFace model directories: model.safetensors, sharded safetensors with an index json,
pytorch_model.bin and its sharded index. Tensors are read by byte range, one at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from ckpt_core.errors import FormatError, clip
from ckpt_core.formats.protocol import OpenOptions, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.safetensors_header import (
    Entry,
    json_budget,
    read_elements,
    read_header,
    read_tensor,
)
from ckpt_core.formats.torchzip import LazyTensor, LazyTorchFile, iter_tensors
from ckpt_core.io.storage import Location, safe_relative, split_url

__all__ = [
    "BIN_INDEX",
    "BIN_SINGLE",
    "FORMAT",
    "HFFormat",
    "HFReader",
    "LAYOUTS",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "SAFETENSORS_SUFFIX",
    "StoredTensor",
    "read_weight_map",
]

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SUFFIX = ".safetensors"
# An index's weight_map names every tensor of a model: the largest real ones hold ~150k
# (MoE experts stored one by one) in under 20 MB of JSON.
MAX_INDEX_BYTES = 64_000_000
MAX_INDEX_ENTRIES = 1_000_000


def read_weight_map(root: Location, index_name: str) -> dict[str, str]:
    """tensor name -> shard file, every file name checked to stay inside the directory."""
    where = root.file(index_name)
    index_bytes = root.size(index_name)
    if index_bytes > MAX_INDEX_BYTES:
        raise FormatError(
            f"{where}: {index_bytes} bytes is more than an index ckptflow reads "
            f"({MAX_INDEX_BYTES}; corrupt or hostile file)"
        )
    raw = root.read_bytes(index_name)
    json_budget(raw, where, objects=10_000, values=MAX_INDEX_ENTRIES + 10_000)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise FormatError(f"{where}: not valid JSON ({str(e)[:200]})") from e
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{where}: no weight_map")
    checked = {str(name): safe_relative(str(file), where) for name, file in weight_map.items()}
    missing = sorted({f for f in checked.values() if not root.exists(f)})
    if missing:
        raise FormatError(f"{where}: weight_map names files that do not exist: {clip(missing)}")
    return checked


def _check_files_match_map(
    where: str, weight_map: dict[str, str], found: Mapping[str, str]
) -> None:
    unlisted = sorted(set(found) - set(weight_map))
    absent = sorted(name for name, file in weight_map.items() if found.get(name) != file)
    if unlisted or absent:
        raise FormatError(
            f"{where}: index and shards disagree: "
            + (f"tensors not in the index: {clip(unlisted)}; " if unlisted else "")
            + (f"indexed tensors missing from their shard: {clip(absent)}" if absent else "")
        )


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a safetensors file, read like a `LazyTensor`: whole, or by element range."""

    root: Location
    file: str
    entry: Entry

    @property
    def dtype(self) -> torch.dtype:
        return self.entry.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    def materialize(self) -> torch.Tensor:
        return read_tensor(self.root, self.file, self.entry)

    def read_range(self, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return read_elements(self.root, self.file, self.entry, start, count, out)


def _safetensors(root: Location, file: str) -> list[tuple[str, StoredTensor | LazyTensor]]:
    return [(n, StoredTensor(root, file, e)) for n, e in read_header(root, file).entries.items()]


def _torch_bin(root: Location, file: str) -> list[tuple[str, StoredTensor | LazyTensor]]:
    return list(iter_tensors(LazyTorchFile(root, file).obj))


# Each HF weight layout: (single file, index json, how a file lists its tensors, facts name).
LAYOUTS = (
    (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, _safetensors, "hf-safetensors"),
    (BIN_SINGLE, BIN_INDEX, _torch_bin, "hf-bin"),
)


@dataclass
class HFReader:
    """Safetensors or pytorch_model.bin files, one or sharded with an index json."""

    root: Location
    files: list[str]
    tensors_of: Callable[[Location, str], list[tuple[str, StoredTensor | LazyTensor]]]
    kind: str
    index_name: str
    weight_map: dict[str, str] | None = None

    @cached_property
    def _tensors(self) -> dict[str, StoredTensor | LazyTensor]:
        found: dict[str, StoredTensor | LazyTensor] = {}
        owner: dict[str, str] = {}
        for file in self.files:
            for name, tensor in self.tensors_of(self.root, file):
                if name in found:
                    raise FormatError(
                        f"{self.root.file(file)}: tensor {name!r} is also in {owner[name]}"
                    )
                found[name], owner[name] = tensor, file
        if self.weight_map is not None:
            _check_files_match_map(self.root.file(self.index_name), self.weight_map, owner)
            found = {name: found[name] for name in self.weight_map}
        return found

    def index(self) -> Mapping[str, TensorInfo]:
        return {n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return lookup(self._tensors, name, self.root.url).materialize()

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return lookup(self._tensors, name, self.root.url).read_range(start, count, out)

    def facts(self) -> SourceFacts:
        return SourceFacts(self.kind, list(self.files))

    def asset_dirs(self) -> list[Location]:
        return [self.root]


def _refuse_unfinished(root: Location) -> None:
    """ckptflow's own output is only complete with its marker (written last)."""
    names = set(root.listdir())
    if names & {"manifest.json", ".ckptflow-incomplete"} and "_SUCCESS" not in names:
        raise FormatError(
            f"{root.url}: an unfinished ckptflow output (no _SUCCESS marker): a conversion "
            "to it died or is still running; run that conversion again to finish it"
        )


class HFFormat:
    name = "hf"

    def detect(self, root: Location) -> bool:
        if root.url.rstrip("/").endswith(SAFETENSORS_SUFFIX) and not root.isdir():
            return root.exists()  # one lone safetensors file, whatever its name
        names = set(root.listdir())
        # An unfinished ckptflow output is claimed too, so that open() says what it is.
        markers = {
            SAFETENSORS_SINGLE,
            SAFETENSORS_INDEX,
            BIN_SINGLE,
            BIN_INDEX,
            ".ckptflow-incomplete",
        }
        return bool(names & markers)

    def open(self, root: Location, options: OpenOptions) -> HFReader:
        if root.url.rstrip("/").endswith(SAFETENSORS_SUFFIX) and not root.isdir():
            # The file alone: read from the directory it is in (a config.json there is found
            # as for a model directory), its tensors only, no index.
            parent, name = split_url(root.url.rstrip("/"))
            if not root.exists():
                raise FormatError(f"{root.url}: no such file")
            _refuse_unfinished(Location(parent))
            return HFReader(Location(parent), [name], _safetensors, "safetensors-file", "")
        _refuse_unfinished(root)
        names = set(root.listdir())
        for single, index_name, tensors_of, kind in LAYOUTS:
            if index_name in names:
                weight_map = read_weight_map(root, index_name)
                files = sorted(set(weight_map.values()))
                return HFReader(root, files, tensors_of, kind, index_name, weight_map)
            if single in names:
                return HFReader(root, [single], tensors_of, kind, index_name)
        raise FormatError(f"{root.url}: no model.safetensors, pytorch_model.bin or index json")


FORMAT = HFFormat()
