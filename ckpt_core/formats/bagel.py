"""BAGEL-style sharded training directories: two models (main and EMA) in one step directory.

`{ckpt_dir}/{train_steps:07d}/` holds `metadata.json` (`checkpoint_type: "sharded"`,
`world_size`, `has_ema`, ...) and each model either as a DCP folder (`model_sharded/`,
`ema_sharded/`, read by `dcp.DcpReader`) or as per-rank files (`model_rank{r:05d}.pt`,
`ema_rank{r:05d}.pt`, read by `fsdp_ranks.FsdpRanksReader`). Optimizer, scheduler and
data-status files are trainer state: ignored, with a note. Both models are exposed under
`main/<name>` and `ema/<name>` (families.bagel.model_name); the plan writes each to its own files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from ckpt_core.errors import FormatError
from ckpt_core.families.bagel import MODELS, model_name, split_model_name
from ckpt_core.formats.dcp import METADATA as DCP_METADATA
from ckpt_core.formats.dcp import DcpReader
from ckpt_core.formats.fsdp_ranks import FsdpRanksReader
from ckpt_core.formats.protocol import OpenOptions, Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.io.storage import Location

__all__ = ["FORMAT", "METADATA", "BagelFormat", "BagelReader"]

METADATA = "metadata.json"
_MAX_METADATA_BYTES = 1_000_000  # a few fields; BAGEL's is ~200 bytes
SHARDED = "sharded"
_DCP_DIRS = {"main": "model_sharded", "ema": "ema_sharded"}
_RANK_FILES = {"main": "model_rank{:05d}.pt", "ema": "ema_rank{:05d}.pt"}
_RANK = {
    m: re.compile("^" + p.replace("{:05d}", r"(\d{5})").replace(".", r"\.") + "$")
    for m, p in _RANK_FILES.items()
}
# Trainer state beside the models: never weights.
_TRAINER_STATE = re.compile(
    r"^(optimizer_rank\d{5}\.pt|scheduler\.pt|data_status\.pt|model_full\.safetensors)$"
)


def read_metadata(root: Location) -> dict[str, Any]:
    where = root.file(METADATA)
    if root.size(METADATA) > _MAX_METADATA_BYTES:
        raise FormatError(f"{where}: larger than any trainer's metadata (corrupt or hostile file)")
    try:
        parsed = json.loads(root.read_text(METADATA))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: not valid JSON ({str(e)[:200]})") from e
    if not isinstance(parsed, dict):
        raise FormatError(f"{where}: not a JSON object")
    return parsed


class BagelReader:
    """The models of one step directory, each read by its own format's reader."""

    def __init__(self, root: Location, parts: Mapping[str, tuple[str, Reader]], notes: list[str]):
        self.root = root
        self._parts = dict(parts)  # model -> (folder or "" for rank files, reader)
        self._notes = notes
        self._index: dict[str, TensorInfo] = {}
        for model, (_, reader) in self._parts.items():
            for name, info in reader.index().items():
                full = model_name(model, name)
                self._index[full] = TensorInfo(full, info.dtype, info.shape)

    def models(self) -> tuple[str, ...]:
        return tuple(m for m in MODELS if m in self._parts)

    def index(self) -> Mapping[str, TensorInfo]:
        return self._index

    def _inner(self, name: str) -> tuple[Reader, str]:
        lookup(self._index, name, self.root.url)
        model, rest = split_model_name(name)
        return self._parts[model][1], rest

    def read(self, name: str) -> torch.Tensor:
        reader, rest = self._inner(name)
        return reader.read(rest)

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        reader, rest = self._inner(name)
        read_range = getattr(reader, "read_range", None)
        if read_range is None:  # rank files: read whole, then slice
            flat = reader.read(rest).reshape(-1)[start : start + count]
            return flat if out is None else out.copy_(flat)
        result: torch.Tensor = read_range(rest, start, count, out)
        return result

    def facts(self) -> SourceFacts:
        files = [METADATA]
        notes = list(self._notes)
        for model, (folder, reader) in self._parts.items():
            inner = reader.facts()
            files += [f"{folder}/{f}" if folder else f for f in inner.files]
            notes += [f"{model}: {note}" for note in inner.notes]
        return SourceFacts("bagel", files, notes)

    def asset_dirs(self) -> list[Location]:
        return [self.root]  # a step directory holds no config: --base gives it


def _open_model(root: Location, model: str, world: int | None) -> tuple[str, Reader] | None:
    folder = _DCP_DIRS[model]
    if root.isdir(folder) and root.exists(f"{folder}/{DCP_METADATA}"):
        return folder, DcpReader(root.child(folder))
    ranks = {int(m.group(1)): n for n in root.listdir() if (m := _RANK[model].match(n))}
    if not ranks:
        return None
    world = world if world is not None else max(ranks) + 1
    stale = sorted(n for r, n in ranks.items() if r >= world)
    if stale:
        raise FormatError(
            f"{root.url}: rank file(s) {', '.join(stale)} beyond world size {world} in "
            f"{METADATA}; a stale file from another run? remove it"
        )
    missing = [_RANK_FILES[model].format(r) for r in range(world) if r not in ranks]
    if missing:
        raise FormatError(
            f"{root.url}: missing rank file(s) {', '.join(missing)} of world size {world}"
        )
    files = [ranks[r] for r in range(world)]
    return "", FsdpRanksReader(root, files, world, [])


class BagelFormat:
    name = "bagel"

    def detect(self, root: Location) -> bool:
        if not root.isdir() or not root.exists(METADATA):
            return False
        try:
            return read_metadata(root).get("checkpoint_type") == SHARDED
        except FormatError:
            return False

    def open(self, root: Location, options: OpenOptions) -> Reader:
        meta = read_metadata(root)
        where = root.file(METADATA)
        world = meta.get("world_size")
        if world is not None and (type(world) is not int or world < 1):
            raise FormatError(f"{where}: world_size {world!r} is not a positive integer")
        has_ema = meta.get("has_ema", True)
        parts: dict[str, tuple[str, Reader]] = {}
        notes: list[str] = []
        for model in MODELS:
            opened = _open_model(root, model, world)
            if opened is None:
                continue
            if model == "ema" and has_ema is False:
                notes.append(f"{where} says has_ema: false: the EMA files beside it are not read")
                continue
            parts[model] = opened
        if "main" not in parts:
            raise FormatError(
                f"{root.url}: {where} says sharded, but neither {_DCP_DIRS['main']}/ nor "
                f"{_RANK_FILES['main'].format(0)} is there"
            )
        if has_ema is True and "ema" not in parts and "has_ema" in meta:
            raise FormatError(
                f"{root.url}: {where} says has_ema: true, but neither {_DCP_DIRS['ema']}/ nor "
                f"{_RANK_FILES['ema'].format(0)} is there (incomplete copy?)"
            )
        ignored = sorted(n for n in root.listdir() if _TRAINER_STATE.match(n))
        if ignored:
            notes.append(
                f"ignored trainer state (not model weights): {', '.join(ignored[:6])}"
                + (f" and {len(ignored) - 6} more" if len(ignored) > 6 else "")
            )
        return BagelReader(root, parts, notes)


FORMAT = BagelFormat()
