"""No silent damage in a cast: a finite source value that the target dtype cannot hold (an fp32
7e4 cast to fp16 becomes inf) fails the conversion, naming the tensor, unless overflow is
allowed. Values that were already inf or nan stay as they are: that is a faithful copy."""

from __future__ import annotations

import torch

from ckpt_core.errors import CastOverflowError

__all__ = ["check_cast", "narrows_range"]

# What to suggest instead, by the target that overflowed: dtypes whose range holds the value.
_WIDER = {torch.float16: "--dtype bf16 or keep", torch.bfloat16: "--dtype fp32 or keep"}


def narrows_range(source: torch.dtype, out: torch.dtype) -> bool:
    """Whether a cast can turn a finite value into inf (fp32 -> fp16, and -> bf16 just below
    fp32's max; fp16 -> bf16 cannot)."""
    if not (source.is_floating_point and out.is_floating_point):
        return False
    return torch.finfo(out).max < torch.finfo(source).max


def check_cast(name: str, source: torch.Tensor, out: torch.Tensor) -> None:
    """Raise `CastOverflowError` when `out` (= `source` cast) is non-finite where `source` was
    finite. The common case costs one reduction over `out` (min and max are finite exactly
    when every value is: both propagate nan), ~0.3 ms per 8 MiB chunk, no allocation."""
    low, high = torch.aminmax(out)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    overflowed = torch.isfinite(source) & ~torch.isfinite(out)
    if not bool(overflowed.any()):
        return  # the non-finite values were so in the source
    count = int(overflowed.sum())
    largest = float(source[overflowed].abs().max())
    target = str(out.dtype).removeprefix("torch.")
    wider = _WIDER.get(out.dtype, "--dtype keep")
    raise CastOverflowError(
        f"{name}: {count} finite value(s) overflow {target} (largest |x| = {largest:.6g}, "
        f"{target}'s max is {torch.finfo(out.dtype).max:.6g}): nothing was published; "
        f"convert with {wider}, or pass --allow-overflow to write them as inf"
    )
