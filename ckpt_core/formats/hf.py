"""HuggingFace model directories: model.safetensors, sharded safetensors with an index json,
pytorch_model.bin and its sharded index. Tensors are read by byte range, one at a time."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from ckpt_core.errors import FormatError, clip
from ckpt_core.formats.protocol import OpenOptions, SourceFacts, TensorInfo
from ckpt_core.formats.safetensors_header import Entry, read_elements, read_header, read_tensor
from ckpt_core.formats.torchzip import LazyTensor, LazyTorchFile, iter_tensors
from ckpt_core.io.storage import Location, safe_relative

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_weight_map(root: Location, index_name: str) -> dict[str, str]:
    """tensor name -> shard file, every file name checked to stay inside the directory."""
    where = root.file(index_name)
    try:
        parsed = json.loads(root.read_text(index_name))
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from e
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


@dataclass
class SafetensorsReader:
    root: Location
    files: list[str]
    weight_map: dict[str, str] | None = None

    @cached_property
    def _entries(self) -> dict[str, tuple[str, Entry]]:
        found: dict[str, tuple[str, Entry]] = {}
        for file in self.files:
            for name, entry in read_header(self.root, file).entries.items():
                if name in found:
                    raise FormatError(
                        f"{self.root.file(file)}: tensor {name!r} is also in {found[name][0]}"
                    )
                found[name] = (file, entry)
        if self.weight_map is not None:
            where = self.root.file(SAFETENSORS_INDEX)
            _check_files_match_map(where, self.weight_map, {n: f for n, (f, _) in found.items()})
            found = {name: found[name] for name in self.weight_map}
        return found

    def index(self) -> Mapping[str, TensorInfo]:
        return {name: TensorInfo(name, e.dtype, e.shape) for name, (_, e) in self._entries.items()}

    def read(self, name: str) -> torch.Tensor:
        file, entry = self._entries[name]
        return read_tensor(self.root, file, entry)

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        file, entry = self._entries[name]
        return read_elements(self.root, file, entry, start, count, out)

    def facts(self) -> SourceFacts:
        return SourceFacts("hf-safetensors", list(self.files))

    def asset_dirs(self) -> list[Location]:
        return [self.root]


@dataclass
class TorchBinReader:
    root: Location
    files: list[str]
    weight_map: dict[str, str] | None = None

    @cached_property
    def _tensors(self) -> dict[str, LazyTensor]:
        found: dict[str, LazyTensor] = {}
        owner: dict[str, str] = {}
        for file in self.files:
            for name, tensor in iter_tensors(LazyTorchFile(self.root, file).obj):
                if name in found:
                    raise FormatError(
                        f"{self.root.file(file)}: tensor {name!r} is also in {owner[name]}"
                    )
                found[name], owner[name] = tensor, file
        if self.weight_map is not None:
            _check_files_match_map(self.root.file(BIN_INDEX), self.weight_map, owner)
            found = {name: found[name] for name in self.weight_map}
        return found

    def index(self) -> Mapping[str, TensorInfo]:
        return {name: TensorInfo(name, t.dtype, t.shape) for name, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].materialize()

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._tensors[name].read_range(start, count, out)

    def facts(self) -> SourceFacts:
        return SourceFacts("hf-bin", list(self.files))

    def asset_dirs(self) -> list[Location]:
        return [self.root]


class HFFormat:
    name = "hf"

    def detect(self, root: Location) -> bool:
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

    def open(self, root: Location, options: OpenOptions) -> SafetensorsReader | TorchBinReader:
        names = set(root.listdir())
        if names & {"manifest.json", ".ckptflow-incomplete"} and "_SUCCESS" not in names:
            # ckptflow's own output is only complete with its marker (written last).
            raise FormatError(
                f"{root.url}: an unfinished ckptflow output (no _SUCCESS marker): a conversion "
                "to it died or is still running; run that conversion again to finish it"
            )
        if SAFETENSORS_INDEX in names:
            weight_map = read_weight_map(root, SAFETENSORS_INDEX)
            return SafetensorsReader(root, sorted(set(weight_map.values())), weight_map)
        if SAFETENSORS_SINGLE in names:
            return SafetensorsReader(root, [SAFETENSORS_SINGLE])
        if BIN_INDEX in names:
            weight_map = read_weight_map(root, BIN_INDEX)
            return TorchBinReader(root, sorted(set(weight_map.values())), weight_map)
        if BIN_SINGLE in names:
            return TorchBinReader(root, [BIN_SINGLE])
        raise FormatError(f"{root.url}: no model.safetensors, pytorch_model.bin or index json")


FORMAT = HFFormat()
