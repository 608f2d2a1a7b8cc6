"""dtype names: safetensors header strings, names on torch, CLI choices, the cast rule."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ckpt_core.errors import FormatError, UsageError

__all__ = [
    "DTYPE_TO_SAFETENSORS",
    "SAFETENSORS_DTYPES",
    "TARGET_DTYPES",
    "Sized",
    "TargetDtype",
    "TORCH_DTYPES",
    "flat_buffer",
    "from_safetensors",
    "itemsize",
    "output_dtype",
    "parse_target",
    "to_safetensors",
]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Every torch dtype by its attribute name on `torch`, aliases included (`float`, `half`): a
# pickle names a dtype as the global torch.<name>.
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}

# What `--dtype` accepts: a cast for floating-point tensors, or "keep" (each its stored dtype).
TargetDtype = Literal["bf16", "fp16", "fp32", "keep"]
TARGET_DTYPES: dict[str, torch.dtype | None] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "keep": None,
}


def from_safetensors(name: str, where: str) -> torch.dtype:
    try:
        return SAFETENSORS_DTYPES[name]
    except KeyError:
        raise FormatError(f"{where}: unknown safetensors dtype {name!r}") from None


def to_safetensors(dtype: torch.dtype) -> str:
    try:
        return DTYPE_TO_SAFETENSORS[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_target(name: str) -> torch.dtype | None:
    try:
        return TARGET_DTYPES[name]
    except KeyError:
        raise UsageError(
            f"unknown --dtype {name!r}: choose one of {', '.join(TARGET_DTYPES)}"
        ) from None


def output_dtype(source: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """Only floating-point tensors are cast; integer and bool tensors keep their dtype."""
    if target is None or not source.is_floating_point:
        return source
    return target


class Sized:
    """`numel` and `nbytes` of anything with a `shape` and a `dtype` (a tensor's description)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def flat_buffer(out: torch.Tensor | None, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Where a ranged read lands: `out`, checked to be `count` contiguous elements of `dtype`,
    or a new buffer."""
    if out is None:
        return torch.empty(count, dtype=dtype)
    if out.dtype != dtype or out.shape != (count,) or not out.is_contiguous():
        raise ValueError(
            f"out must be {count} contiguous {dtype} elements, got {out.dtype} {tuple(out.shape)}"
        )
    return out
