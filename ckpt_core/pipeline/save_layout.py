"""The source transform that lays tensors out as the installed transformers' `save_pretrained`
writes them: in-memory names (fused MoE experts, `model.language_model.*`) become the on-disk
names, each a slice of one source tensor, streamed (a ranged read when the slice is whole rows).

Tensors already under their saved name pass through; anything the model does not know passes
through too, for the model check (`modelcheck`) to name.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ckpt_core.families.hf_layout import ModelLayout, Piece, model_layout
from ckpt_core.formats.protocol import Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.stream import RangeReader

if TYPE_CHECKING:
    from ckpt_core.pipeline.source import Source

__all__ = ["SavedLayoutReader", "config_where", "save_layout"]


def config_where(source: Source) -> str:
    """Where the source's config.json came from (for messages)."""
    for asset in source.assets:
        if asset.name == "config.json":
            return str(Location(asset.url).file("config.json"))
    return "config.json"


def save_layout(reader: Reader, source: Source) -> Reader:
    """A `TRANSFORMS` entry: the reader under save_pretrained's names, or the same reader when
    there is no config or nothing to rename."""
    config = source.config
    if not config or not config.get("model_type"):
        return reader
    layout = model_layout(config, config_where(source))
    if not layout.renames():
        return reader
    index = reader.index()
    derived: dict[str, Piece] = {}
    for name, piece in layout.saved.items():
        have = index.get(piece.source)
        if name in index or have is None or have.shape != layout.memory[piece.source]:
            continue  # present as saved, absent, or of another shape: the model check says so
        if piece.source != name or piece.shape != have.shape or piece.offset:
            derived[name] = piece
    if not derived:
        return reader
    return SavedLayoutReader(reader, layout, derived)


class SavedLayoutReader:
    """`inner`'s tensors, with the in-memory ones `derived` from laid out as saved."""

    def __init__(self, inner: Reader, layout: ModelLayout, derived: Mapping[str, Piece]) -> None:
        self.root = inner.root
        self._inner = inner
        self._layout = layout
        self._derived = dict(derived)
        inner_index = inner.index()
        used = {p.source for p in derived.values()}
        index: dict[str, TensorInfo] = {}
        for name, info in inner_index.items():
            if name not in used:
                index[name] = info
        for name, piece in derived.items():
            index[name] = TensorInfo(name, inner_index[piece.source].dtype, piece.shape)
        self._index = index
        self._whole = threading.local()  # the last whole source tensor, for strided slices
        self._used = sorted(used)

    def index(self) -> Mapping[str, TensorInfo]:
        return self._index

    def read(self, name: str) -> torch.Tensor:
        piece = self._derived.get(name)
        if piece is None:
            lookup(self._index, name, self.root.path)
            return self._inner.read(name)
        return self.read_range(name, 0, piece.numel).view(piece.shape)

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        piece = self._derived.get(name)
        if piece is None:
            lookup(self._index, name, self.root.path)
            if isinstance(self._inner, RangeReader):
                return self._inner.read_range(name, start, count, out)
            return _into(self._inner.read(name).reshape(-1)[start : start + count], out)
        if piece.contiguous and isinstance(self._inner, RangeReader):
            return self._inner.read_range(piece.source, piece.offset + start, count, out)
        view = self._source(piece.source).as_strided(piece.shape, piece.stride, piece.offset)
        return _into(view.reshape(-1)[start : start + count], out)

    def _source(self, name: str) -> torch.Tensor:
        """One whole source tensor per thread, kept while its slices are read in turn."""
        held = getattr(self._whole, "held", None)
        if held is None or held[0] != name:
            held = (name, self._inner.read(name).contiguous())
            self._whole.held = held
        return held[1]

    def facts(self) -> SourceFacts:
        facts = self._inner.facts()
        note = (
            f"laid out as {self._layout.architecture}.save_pretrained writes it: "
            f"{len(self._used)} in-memory tensors written as {len(self._derived)}"
        )
        return SourceFacts(facts.format, facts.files, [*facts.notes, note])

    def asset_dirs(self) -> list[Location]:
        return self._inner.asset_dirs()


def _into(chunk: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return chunk.clone()
    return out.copy_(chunk)
