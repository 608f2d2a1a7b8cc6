"""Tensor-parallel rank files of a disaggregated VLM run, read as one HF model.

Layout (an EPOCH_DIR): `vision/rank_K.pt` and `text/rank_K.pt`, each `{"model": local
shard state dict}` keyed by the split's names (plain tensors or DTensor local shards), and
`metadata.json` with the parallel size. The model family (from the base model's config)
declares each tensor's role; `read(name)` materialises that tensor's piece from every rank
by ranged reads and merges them by the role. The index is in the key layout the installed
transformers saves, so a conversion of this reader is a `from_pretrained`-ready directory.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.errors import FormatError, KeyMismatchError, clip
from ckpt_core.families import Family, family_for, load_config
from ckpt_core.families.hf_layout import head_is_tied, head_to_drop
from ckpt_core.families.model_config import CONFIG, TIED_HEAD
from ckpt_core.families.tp_roles import Kind, Role, merge_from, merged_shape
from ckpt_core.formats import hf
from ckpt_core.formats.fsdp_ranks import check_same_names
from ckpt_core.formats.protocol import OpenOptions, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.torchzip import LazyTensor, LazyTorchFile, iter_tensors
from ckpt_core.formats.unpickle import DTENSOR, DTensorRef, Recorded, Replicate, Shard
from ckpt_core.io.storage import Location

__all__ = ["FORMAT", "METADATA", "TpRanksFormat", "TpRanksReader"]

METADATA = "metadata.json"
_RANK_FILE = re.compile(r"rank_(\d+)\.pt")


def _placement_fits(placements: tuple[Recorded, ...], role: Role) -> bool:
    """A DTensor's own placement must agree with the declared role (if it has one)."""
    if not placements:
        return True
    if len(placements) != 1:
        return False  # 2-D meshes are not a tensor-parallel layout this reader knows
    kind = type(placements[0])
    if kind is Replicate:
        return role.kind is Kind.REPLICATED
    if kind is Shard:
        return role.dim is not None and placements[0].field("dim") == role.dim
    return False


@dataclass
class _Entry:
    part: str
    local: str
    role: Role
    pieces: list[LazyTensor]  # rank order


class TpRanksReader:
    def __init__(self, root: Location, options: OpenOptions) -> None:
        self.root = root
        self.base = Location(options.base) if options.base else None
        config_dir = self.base or root
        self.config = load_config(config_dir)
        self.family: Family = family_for(self.config, config_dir.file("config.json"))
        self.vocab_size = self.family.vocab_size(self.config)
        self.tied = head_is_tied(self.config, config_dir.file(CONFIG))
        self.layout = self.family.saved_layout()
        self.sizes = self._parallel_sizes(options.parallel_size)
        self.notes: list[str] = [f"key layout written: {self.layout}"]
        self._entries = self._build(options)

    # -- opening -------------------------------------------------------------------------
    def _parallel_sizes(self, asked: int | None) -> dict[str, int]:
        where = self.root.file(METADATA)
        meta: dict[str, Any] = {}
        if self.root.exists(METADATA):
            try:
                meta = json.loads(self.root.read_text(METADATA))
            except json.JSONDecodeError as e:
                raise FormatError(f"{where}: not valid JSON ({e})") from e
        sizes: dict[str, int] = {}
        for part in self.family.parts:
            declared = meta.get(part.name, {}).get("parallel_size", meta.get("parallel_size"))
            if declared is not None and asked is not None and int(declared) != asked:
                raise FormatError(
                    f"{where}: {part.name} parallel_size is {declared} but --parallel-size is "
                    f"{asked}: check which run this is, or drop --parallel-size"
                )
            size = asked if asked is not None else declared
            if size is None:
                raise FormatError(
                    f"{where}: no parallel_size (file missing or without it): pass --parallel-size"
                )
            if int(size) < 1:
                raise FormatError(f"{where}: parallel_size must be >= 1, got {size}")
            sizes[part.name] = int(size)
        return sizes

    def _rank_files(self, part: str) -> list[str]:
        folder = self.root.child(part)
        found = {int(m.group(1)): n for n in folder.listdir() if (m := _RANK_FILE.fullmatch(n))}
        size = self.sizes[part]
        if sorted(found) != list(range(size)):
            raise FormatError(
                f"{folder.path}: expected rank_0.pt .. rank_{size - 1}.pt for parallel size "
                f"{size}, found {clip([found[k] for k in found]) or 'none'}"
            )
        return [f"{part}/{found[k]}" for k in range(size)]

    def _load_rank(self, relative: str) -> dict[str, LazyTensor | DTensorRef]:
        lazy = LazyTorchFile(self.root, relative, extra_globals=DTENSOR)
        obj = lazy.obj
        if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
            raise FormatError(f"{lazy.where}: expected {{'model': state_dict}}")
        others = sorted(str(k) for k in obj if k != "model" and iter_tensors(obj[k]))
        if others:
            raise FormatError(
                f"{lazy.where}: tensors outside 'model' under {others}: not a layout this merge knows"
            )
        pieces: dict[str, LazyTensor | DTensorRef] = {}
        for key, value in obj["model"].items():
            if isinstance(value, LazyTensor | DTensorRef):
                pieces[str(key)] = value
            else:
                for name, tensor in iter_tensors(value, str(key)):
                    pieces[name] = tensor
        return pieces

    def _build(self, options: OpenOptions) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        for part in self.family.parts:
            files = self._rank_files(part.name)
            ranks = [self._load_rank(f) for f in files]
            check_same_names(self.root, files, ranks)
            names = list(ranks[0])
            table = self.family.roles[part.name]
            for local in names:
                role = table.role_of(local)
                lazies = []
                for rank, pieces in enumerate(ranks):
                    piece = pieces[local]
                    if isinstance(piece, DTensorRef):
                        if not _placement_fits(piece.placements, role):
                            raise FormatError(
                                f"{self.root.file(files[rank])}: {local!r} is a DTensor placed "
                                f"{[type(p).__name__ for p in piece.placements]}, which "
                                f"disagrees with its declared role {role.kind.value}"
                            )
                        piece = piece.local
                    lazies.append(piece)
                if len({p.dtype for p in lazies}) != 1:
                    raise FormatError(f"{part.name} {local!r}: ranks hold different dtypes")
                entries[self.family.to_hf(part.name, local, self.layout)] = _Entry(
                    part.name, local, role, lazies
                )
        head = self.family.to_hf("text", TIED_HEAD, self.layout)
        if head_to_drop(entries, tied=self.tied, where=self.root.path, head=head):
            self.notes.append("lm_head.weight dropped: the config ties it to embed_tokens")
            del entries[head]
        self._check_keys(entries, options)
        return entries

    def _check_keys(self, entries: Mapping[str, _Entry], options: OpenOptions) -> None:
        """Strict: the merged names must be the base model's names (in the saved layout)."""
        if self.base is None or not self._base_has_weights():
            return
        base = hf.FORMAT.open(self.base, OpenOptions())
        base_names = list(base.index())
        layout = self.family.detect_layout(base_names, self.base.url)
        expected = {
            self.family.to_hf(*self.family.to_part(n, layout), self.layout) for n in base_names
        }
        if self.tied:
            expected.discard(self.family.to_hf("text", TIED_HEAD, self.layout))
        allowed = options.allow_missing
        missing = {
            n for n in expected - set(entries) if not any(fnmatch.fnmatch(n, p) for p in allowed)
        }
        unexpected = set(entries) - expected
        if missing or unexpected:
            raise KeyMismatchError(
                f"{self.root.path}: merged names differ from the base model {self.base.url}: "
                + (f"missing {clip(missing)}; " if missing else "")
                + (f"not in the base {clip(unexpected)}" if unexpected else "")
            )

    def _base_has_weights(self) -> bool:
        assert self.base is not None
        weights = {hf.SAFETENSORS_SINGLE, hf.SAFETENSORS_INDEX, hf.BIN_SINGLE, hf.BIN_INDEX}
        return bool(weights & set(self.base.listdir()))

    # -- Reader --------------------------------------------------------------------------
    def index(self) -> Mapping[str, TensorInfo]:
        return {
            name: TensorInfo(
                name,
                e.pieces[0].dtype,
                merged_shape(
                    f"{e.part} {e.local}", e.role, [p.shape for p in e.pieces], self.vocab_size
                ),
            )
            for name, e in self._entries.items()
        }

    def read(self, name: str) -> torch.Tensor:
        entry = lookup(self._entries, name, self.root.path)
        return merge_from(
            f"{entry.part} {entry.local}",
            entry.role,
            [p.shape for p in entry.pieces],
            lambda rank: entry.pieces[rank].materialize(),
            self.vocab_size,
        )

    def facts(self) -> SourceFacts:
        files = [f for part in self.family.parts for f in self._rank_files(part.name)]
        sizes = ", ".join(f"{p}={n}" for p, n in self.sizes.items())
        return SourceFacts("tp-ranks", files, [f"parallel sizes: {sizes}", *self.notes])

    def asset_dirs(self) -> list[Location]:
        return [self.base] if self.base else [self.root]


class TpRanksFormat:
    name = "tp-ranks"

    def detect(self, root: Location) -> bool:
        names = set(root.listdir())
        if METADATA not in names or not ({"vision", "text"} & names):
            return False
        return any(
            _RANK_FILE.fullmatch(n)
            for part in ("vision", "text")
            for n in root.child(part).listdir()
        )

    def open(self, root: Location, options: OpenOptions) -> TpRanksReader:
        return TpRanksReader(root, options)


FORMAT = TpRanksFormat()
