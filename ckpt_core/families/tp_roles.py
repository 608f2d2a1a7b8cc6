"""Tensor-parallel layer roles: how one tensor is cut across ranks and put back together.

Pure functions over a declared role table (one per model family and part). A role is never
inferred from values and nothing is ever averaged: a tensor no rule names, or whose rank
pieces do not fit the rule, is an error that names it.

- column: concatenated on dim 0 (weights and their biases): q/k/v, gate/up, merger input.
- fused: each rank holds `[a_r; b_r; ...]` on dim 0 (e.g. a fused qkv as `[q_r; k_r; v_r]`);
  the full tensor is `[A; B; ...]` with `A = cat(a_r)`.
- vocab: column-parallel over the vocabulary; the trainer pads the rows to a multiple of
  the rank count and the merge trims them back to the config's vocab size.
- row: concatenated on dim 1 (o_proj, down_proj, attention out-proj); its bias is replicated.
- replicated: identical on every rank; checked equal, one copy kept.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from ckpt_core.errors import FormatError, KeyMismatchError

__all__ = [
    "COLUMN",
    "FUSED_GATE_UP",
    "FUSED_QKV",
    "Kind",
    "REPLICATED",
    "ROW",
    "Role",
    "RoleTable",
    "VOCAB",
    "merge",
    "merge_from",
    "merged_shape",
    "padded_rows",
    "shard",
    "weight_and_bias",
]


class Kind(StrEnum):
    COLUMN = "column"
    FUSED = "fused"
    VOCAB = "vocab"
    ROW = "row"
    REPLICATED = "replicated"


@dataclass(frozen=True)
class Role:
    kind: Kind
    chunks: int = 1  # FUSED: how many blocks are fused on dim 0 (3 for qkv, 2 for gate_up)

    @property
    def dim(self) -> int | None:
        """The dimension the rank pieces are concatenated on, None when replicated."""
        if self.kind is Kind.REPLICATED:
            return None
        return 1 if self.kind is Kind.ROW else 0


COLUMN = Role(Kind.COLUMN)
ROW = Role(Kind.ROW)
VOCAB = Role(Kind.VOCAB)
REPLICATED = Role(Kind.REPLICATED)
FUSED_QKV = Role(Kind.FUSED, chunks=3)
FUSED_GATE_UP = Role(Kind.FUSED, chunks=2)


@dataclass(frozen=True)
class RoleTable:
    """Ordered (regex, role) rules matched against a part's tensor names; first match wins."""

    part: str
    rules: tuple[tuple[str, Role], ...]

    @functools.cached_property
    def _compiled(self) -> tuple[tuple[re.Pattern[str], Role], ...]:
        return tuple((re.compile(p), r) for p, r in self.rules)

    def role_of(self, name: str) -> Role:
        for pattern, role in self._compiled:
            if pattern.fullmatch(name):
                return role
        raise KeyMismatchError(
            f"{self.part} tensor {name!r} has no tensor-parallel role in the family's table: "
            "refusing to guess (never averaged); add a rule for it to the model family"
        )


def weight_and_bias(stem: str, weight: Role, bias: Role | None = None) -> list[tuple[str, Role]]:
    """Rules for `stem.weight` and `stem.bias`; a row-parallel layer's bias is replicated."""
    if bias is None:
        bias = REPLICATED if weight.kind is Kind.ROW else weight
    return [(stem + r"\.weight", weight), (stem + r"\.bias", bias)]


def padded_rows(rows: int, size: int) -> int:
    """Vocab rows padded up to a multiple of the rank count (what the trainer stores)."""
    return -(-rows // size) * size


def shard(name: str, tensor: torch.Tensor, role: Role, rank: int, size: int) -> torch.Tensor:
    """The piece of `tensor` that rank `rank` of `size` holds under `role` (a contiguous copy)."""
    if role.kind is Kind.REPLICATED:
        return tensor.clone()
    if role.kind is Kind.VOCAB:
        rows = padded_rows(tensor.shape[0], size)
        if rows != tensor.shape[0]:
            pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        return tensor.chunk(size, 0)[rank].clone()
    if role.kind is Kind.FUSED:
        blocks = _split_even(name, tensor, role.chunks, 0, "fused blocks")
        return torch.cat([_split_even(name, b, size, 0, "ranks")[rank] for b in blocks]).clone()
    dim = role.dim
    assert dim is not None
    if tensor.dim() <= dim:
        raise FormatError(
            f"{name}: a {role.kind.value}-parallel tensor needs dim {dim}, shape {list(tensor.shape)}"
        )
    return _split_even(name, tensor, size, dim, "ranks")[rank].clone()


def _split_even(
    name: str, tensor: torch.Tensor, parts: int, dim: int, what: str
) -> list[torch.Tensor]:
    if tensor.shape[dim] % parts:
        raise FormatError(
            f"{name}: dim {dim} of shape {list(tensor.shape)} does not divide into {parts} {what}"
        )
    return list(tensor.chunk(parts, dim))


def merged_shape(
    name: str, role: Role, shapes: Sequence[tuple[int, ...]], vocab_size: int | None = None
) -> tuple[int, ...]:
    """The full tensor's shape from its rank pieces' shapes, checked against the role."""
    first = tuple(shapes[0])
    if role.kind is Kind.REPLICATED:
        if any(tuple(s) != first for s in shapes):
            raise FormatError(
                f"{name}: replicated tensor has different shapes on different ranks: "
                f"{[list(s) for s in shapes]}"
            )
        return first
    dim = role.dim
    assert dim is not None
    if len(first) <= dim:
        raise FormatError(
            f"{name}: {role.kind.value}-parallel tensor needs a dim {dim}, rank 0 holds shape {list(first)}"
        )
    for rank, shape in enumerate(shapes):
        other = tuple(shape)
        if len(other) != len(first) or any(
            a != b for d, (a, b) in enumerate(zip(other, first, strict=True)) if d != dim
        ):
            raise FormatError(
                f"{name}: rank {rank} holds shape {list(other)}, rank 0 holds {list(first)}: "
                f"as a {role.kind.value}-parallel tensor they may differ only on dim {dim}"
            )
        if role.kind is Kind.FUSED and other[0] % role.chunks:
            raise FormatError(
                f"{name}: rank {rank} holds {other[0]} rows, not a multiple of the "
                f"{role.chunks} fused blocks"
            )
    total = sum(int(s[dim]) for s in shapes)
    if role.kind is Kind.VOCAB:
        if vocab_size is None:
            raise FormatError(f"{name}: vocab-parallel tensor but no vocab size in the config")
        if total < vocab_size:
            raise FormatError(
                f"{name}: the ranks hold {total} vocab rows in all, fewer than the config's "
                f"vocab_size {vocab_size}: wrong base model or missing rank files?"
            )
        total = vocab_size
    return first[:dim] + (total,) + first[dim + 1 :]


def merge(
    name: str, role: Role, pieces: Sequence[torch.Tensor], vocab_size: int | None = None
) -> torch.Tensor:
    """The full tensor from its rank pieces (rank order), per `role`."""
    return merge_from(name, role, [tuple(p.shape) for p in pieces], lambda r: pieces[r], vocab_size)


def merge_from(
    name: str,
    role: Role,
    shapes: Sequence[tuple[int, ...]],
    load: Callable[[int], torch.Tensor],
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Like `merge`, loading one rank's piece at a time (`load(rank)`) straight into the
    output, so the peak is the full tensor plus one piece, not all pieces plus a copy."""
    shape = merged_shape(name, role, shapes, vocab_size)
    first = load(0)
    if role.kind is Kind.REPLICATED:
        for rank in range(1, len(shapes)):
            piece = load(rank)
            if piece.dtype != first.dtype:
                raise FormatError(f"{name}: rank {rank} holds {piece.dtype}, rank 0 {first.dtype}")
            if not torch.equal(piece, first):
                raise FormatError(
                    f"{name}: replicated tensor differs between rank 0 and rank {rank}: "
                    "the ranks' copies diverged (a tensor-parallel training bug, or a wrong role)"
                )
        return first.contiguous()
    dim = role.dim
    assert dim is not None
    rows = sum(int(s[dim]) for s in shapes)  # before any vocab trim
    out = torch.empty(shape[:dim] + (rows,) + shape[dim + 1 :], dtype=first.dtype)
    # Where each rank's rows go: one slice, or one slice per fused block ([q_r; k_r; v_r]).
    blocks = role.chunks if role.kind is Kind.FUSED else 1
    block_rows = rows // blocks
    offset = 0
    for rank in range(len(shapes)):
        piece = first if rank == 0 else load(rank)
        if piece.dtype != first.dtype:
            raise FormatError(f"{name}: rank {rank} holds {piece.dtype}, rank 0 {first.dtype}")
        width = piece.shape[dim] // blocks
        for b, part in enumerate(torch.split(piece, width, dim) if blocks > 1 else [piece]):
            out.narrow(dim, b * block_rows + offset, width).copy_(part)
        offset += width
        del piece
    if role.kind is Kind.VOCAB and shape[0] != rows:
        return out[: shape[0]].clone()  # own storage: no padding bytes behind the view
    return out
