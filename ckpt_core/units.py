"""Parse human sizes ("5GB", "500MB", "200KB", "1GiB", "1234") once, at the edge."""

from __future__ import annotations

import re

from ckpt_core.errors import UsageError

__all__ = ["format_bytes", "parse_size_bytes"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


def parse_size_bytes(text: str | int) -> int:
    """Decimal units like huggingface_hub (5GB = 5 * 10**9); KiB/MiB/GiB are binary."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"cannot read size {text!r}: use bytes or a unit, e.g. 5GB, 500MB, 200KB")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "").upper()])
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


def format_bytes(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1000
    return f"{value:.2f} TB"
