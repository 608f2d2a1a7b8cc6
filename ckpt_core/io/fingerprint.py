"""A source's fingerprint: names, sizes and change stamps of its files, from a listing only.

Cheap (no data is read), and it changes when the files do: the manifest records it, a
`--cache-dir` copy is reused while it holds, and a conversion refuses to publish when the
source's fingerprint moved under it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["fingerprint"]

# Local files have `mtime`; S3 has `ETag` and `LastModified`; others `created`.
_CHANGE_KEYS = ("mtime", "ETag", "etag", "LastModified", "created")


def fingerprint(listing: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    """sha256 over (name, size, stamp) of each (name, fsspec info) pair, sorted by name."""
    parts = []
    for name, info in sorted(listing, key=lambda item: item[0]):
        stamp = next((str(info[k]) for k in _CHANGE_KEYS if k in info), "")
        parts.append([name, int(info.get("size") or 0), stamp])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
