"""Megatron-core distributed checkpoints (`torch_dist` backend), read as HF Llama-family tensors.

Where they are: Megatron-LM's `latest_checkpointed_iteration.txt` -> `iter_{N:07d}/`, NeMo 2's
`weights/` (names under `module.`), verl's `actor/dist_ckpt`, or the directory itself
(`metadata.json` saying `torch_dist`, a DCP `.metadata`, `__R_N.distcp` files). Underneath it
is DCP, read by `dcp.DcpReader` (chunks by byte range). The common state (0.16's `common.pt`,
0.17+'s `common_state` items inside the distcp files) pickles megatron classes and holds no
weight: it is never unpickled. Megatron is never imported.

The HF names and sizes come from `--base`'s config (`families.megatron_gpt`): each HF tensor
is a list of row blocks of one stacked source tensor, and each block is read from the chunks
it overlaps, by byte range, so a layer's slice is read without the stacked tensor, and a
range of an HF tensor without the rest of it.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from itertools import product

import numpy as np
import torch

from ckpt_core.dtypes import flat_buffer
from ckpt_core.errors import ConfigError, FormatError
from ckpt_core.families.megatron_gpt import Block, Piece, plan_pieces, shape_from_config
from ckpt_core.families.model_config import load_config, transformers_config
from ckpt_core.formats.boxes import Box
from ckpt_core.formats.dcp import METADATA, DcpReader
from ckpt_core.formats.protocol import OpenOptions, Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.torchzip import LazyTensor
from ckpt_core.io.storage import Location

__all__ = ["FORMAT", "MegatronFormat", "MegatronReader", "find_checkpoint"]

BACKEND = "metadata.json"
LATEST = "latest_checkpointed_iteration.txt"
# Where trainers put the torch_dist directory under the one the user names.
NESTED = ("weights", "actor/dist_ckpt", "dist_ckpt")
# Not weights: left out with a note.
SKIPPED = ("_extra_state", "optimizer.", "rng_state", "common_state")
PREFIXES = ("module.",)  # NeMo 2 wraps the model


def _is_dist(root: Location) -> bool:
    """`metadata.json` says torch_dist, beside a DCP `.metadata`."""
    if not (root.isdir() and root.exists(BACKEND) and root.exists(METADATA)):
        return False
    if root.size(BACKEND) > 1 << 16:
        return False
    try:
        meta = json.loads(root.read_text(BACKEND))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("sharded_backend") == "torch_dist"


def find_checkpoint(root: Location) -> str | None:
    """Where, under `root`, is the torch_dist directory the user means ("" for `root` itself);
    None when there is none."""
    if not root.isdir():
        return None
    if root.exists(LATEST) and root.size(LATEST) < 64:
        text = root.read_text(LATEST).strip()
        if not (text.isdigit() or text == "release"):  # never a path of the file's choosing
            return None
        nested = f"iter_{int(text):07d}" if text.isdigit() else text
        return nested if _is_dist(root.child(nested)) else None
    if _is_dist(root):
        return ""
    for nested in NESTED:
        if root.exists(nested) and _is_dist(root.child(nested)):
            return nested
    return None


class MegatronReader:
    def __init__(self, root: Location, options: OpenOptions) -> None:
        self.root = root
        nested = find_checkpoint(root)
        if nested is None:
            raise FormatError(
                f"{root.url}: not a Megatron torch_dist checkpoint ({LATEST}, or {BACKEND} with "
                "sharded_backend torch_dist beside .metadata)"
            )
        found = root.child(nested) if nested else root
        self._nested = nested
        self._dcp = DcpReader(found)
        if not options.base:
            raise ConfigError(
                f"{found.url}: a Megatron checkpoint names no HF model: pass --base HF_DIR "
                "(the HF model training started from; its config gives names and sizes)"
            )
        config_at = Location(options.base).file("config.json")
        config = transformers_config(load_config(Location(options.base)), config_at)
        model = shape_from_config(config, config_at)
        names, skipped = self._model_names()
        shapes = {name: self._dcp.index()[fqn].shape for name, fqn in names.items()}
        self._pieces = plan_pieces(shapes, model, where=found.url, base=config_at)
        self._sources = names
        self._by_layer: dict[str, dict[int, list[tuple[Box, LazyTensor]]]] = {}
        self._lock = threading.Lock()  # readers are shared by the writer and verifier threads
        dtypes = {name: self._dcp.index()[fqn].dtype for name, fqn in names.items()}
        self._index = {
            name: TensorInfo(name, dtypes[piece.blocks[0].source], piece.shape)
            for name, piece in self._pieces.items()
        }
        # DCP's note on byte items lists Megatron's `_extra_state`s: said once, below, instead.
        self._notes = [n for n in self._dcp.facts().notes if "non-tensor (bytes)" not in n]
        if nested:
            self._notes.append(f"read the torch_dist checkpoint in {nested}/")
        if skipped:
            self._notes.append(
                f"left out {len(skipped)} tensors that are not model weights "
                "(optimizer state, _extra_state); the common state and byte items are not read"
            )
        else:
            self._notes.append("the common state and byte items (_extra_state, rng) are not read")
        padded = shapes["embedding.word_embeddings.weight"][0]
        if padded != model.vocab:
            self._notes.append(f"trimmed the padded vocabulary from {padded} to {model.vocab} rows")

    def _model_names(self) -> tuple[dict[str, str], list[str]]:
        """Megatron name (prefix stripped) -> DCP name, and what was left out."""
        names: dict[str, str] = {}
        skipped = []
        for fqn in self._dcp.index():
            if any(marker in fqn for marker in SKIPPED):
                skipped.append(fqn)
                continue
            name = fqn
            for prefix in PREFIXES:
                name = name.removeprefix(prefix)
            names[name] = fqn
        return names, skipped

    def index(self) -> Mapping[str, TensorInfo]:
        return self._index

    def read(self, name: str) -> torch.Tensor:
        info = lookup(self._index, name, self.root.url)
        return self.read_range(name, 0, info.numel).view(info.shape)

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements [start, start+count) in C order, block by block: whole rows straight into
        `out`, a row cut by the range's ends through a one-row buffer."""
        info = lookup(self._index, name, self.root.url)
        piece = self._pieces[name]
        if start < 0 or count < 0 or start + count > info.numel:
            raise IndexError(f"{name}: elements [{start}, {start + count}) of {info.numel}")
        out = flat_buffer(out, count, info.dtype)
        row = math.prod(piece.shape[1:]) if piece.shape else 1
        end = start + count
        first = 0  # the piece's element where the block starts
        for block in piece.blocks:
            lo, hi = max(start, first), min(end, first + block.rows * row)
            first += block.rows * row
            if lo >= hi:
                continue
            rel_lo, rel_hi = lo - (first - block.rows * row), hi - (first - block.rows * row)
            whole_lo, whole_hi = -(-rel_lo // row), rel_hi // row  # whole rows inside
            if whole_lo < whole_hi:
                dest = out[lo - start + whole_lo * row - rel_lo :][: (whole_hi - whole_lo) * row]
                self._rows(block, whole_lo, whole_hi, piece, info.dtype, dest)
            for r in {rel_lo // row, (rel_hi - 1) // row}:  # rows cut by the range's ends
                a, b = max(rel_lo, r * row), min(rel_hi, (r + 1) * row)
                if a < b and (a, b) != (r * row, (r + 1) * row):
                    one = self._rows(block, r, r + 1, piece, info.dtype, None)
                    base = lo - start - rel_lo
                    out[base + a : base + b].copy_(one[a - r * row : b - r * row])
        return out

    def _rows(
        self,
        block: Block,
        r0: int,
        r1: int,
        piece: Piece,
        dtype: torch.dtype,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rows [r0, r1) of a block, flat (into `out` when given)."""
        fqn = self._sources[block.source]
        trailing = piece.shape[1:]
        offsets = (*block.at, block.row + r0, *(0 for _ in trailing))
        sizes = (*(1 for _ in block.at), r1 - r0, *trailing)
        return read_box(self._chunks(fqn, block.at), (offsets, sizes), dtype, out)

    def _chunks(self, fqn: str, at: tuple[int, ...]) -> Sequence[tuple[Box, LazyTensor]]:
        """The chunks that can hold a layer's slice: those of that layer when each chunk is one
        layer (as Megatron saves them), so a range looks at a few chunks, not L x TP of them."""
        with self._lock:
            by_layer = self._by_layer.get(fqn)
            if by_layer is None:
                by_layer = {}
                for chunk in self._dcp.pieces(fqn):
                    (offsets, sizes), _ = chunk
                    key = offsets[0] if offsets and sizes[0] == 1 else -1
                    by_layer.setdefault(key, []).append(chunk)
                self._by_layer[fqn] = by_layer
        if not at or -1 in by_layer:
            return [c for chunks in by_layer.values() for c in chunks]
        return by_layer.get(at[0], [])

    def facts(self) -> SourceFacts:
        facts = self._dcp.facts()
        files = [f"{self._nested}/{f}" if self._nested else f for f in facts.files]
        return SourceFacts("megatron", files, list(self._notes))

    def asset_dirs(self) -> list[Location]:
        return [self.root]


def read_box(
    chunks: Sequence[tuple[Box, LazyTensor]],
    box: Box,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The elements of `box` (offsets, sizes) of a chunked tensor, flat, C order (into `out`
    when given). Each chunk it overlaps gives one contiguous byte range per row of their
    overlap above the first dim the overlap does not span whole (usually one range)."""
    offsets, sizes = box
    flat = flat_buffer(out, math.prod(sizes), dtype)
    shaped = flat.view(sizes)
    for (c_off, c_size), lazy in chunks:
        lo = [max(a, b) for a, b in zip(offsets, c_off, strict=True)]
        hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, c_off, c_size, strict=True)]
        if any(low >= high for low, high in zip(lo, hi, strict=True)):
            continue
        target = shaped[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))]
        local = [a - c for a, c in zip(lo, c_off, strict=True)]
        extent = [b - a for a, b in zip(lo, hi, strict=True)]
        _copy_overlap(lazy, local, extent, target)
    return flat


def _copy_overlap(
    lazy: LazyTensor, local: list[int], extent: list[int], target: torch.Tensor
) -> None:
    shape = list(lazy.shape)
    if not lazy.is_contiguous():  # not as torch_dist writes them: whole chunk, then slice
        whole = lazy.materialize()
        target.copy_(whole[tuple(slice(a, a + n) for a, n in zip(local, extent, strict=True))])
        return
    # Dims from `split` on are whole in the overlap: each run of them is contiguous bytes.
    split = len(shape)
    while split > 0 and local[split - 1] == 0 and extent[split - 1] == shape[split - 1]:
        split -= 1
    run_dims = max(split - 1, 0)  # the partial dim is a contiguous range too
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    run = extent[run_dims] * strides[run_dims] if shape else 1
    for index in product(*(range(n) for n in extent[:run_dims])):
        begin = sum((local[d] + i) * strides[d] for d, i in enumerate(index))
        if run_dims < len(shape):
            begin += local[run_dims] * strides[run_dims]
        place = target[index] if index else target
        if place.is_contiguous():
            lazy.read_range(begin, run, place.view(-1))
        else:  # a TP column block of whole rows: read, then spread over the rows
            _spread(place, lazy.read_range(begin, run))


def _spread(place: torch.Tensor, flat: torch.Tensor) -> None:
    """`place.copy_(flat)` by numpy's single-threaded copy: torch's parallel copy waits on its
    threads, 10-100x slower when other processes keep the cores busy (measured here)."""
    np.copyto(place.view(torch.uint8).numpy(), flat.view(place.shape).view(torch.uint8).numpy())


class MegatronFormat:
    name = "megatron"

    def detect(self, root: Location) -> bool:
        return find_checkpoint(root) is not None

    def open(self, root: Location, options: OpenOptions) -> Reader:
        return MegatronReader(root, options)


FORMAT = MegatronFormat()
