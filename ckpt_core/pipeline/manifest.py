"""manifest.json: per file size and sha256, the source's fingerprint, the options, the version.
No timestamps, so the same conversion always writes the same bytes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ckpt_core import __version__
from ckpt_core.io.fingerprint import fingerprint as listing_fingerprint
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.writer import FileRecord

__all__ = ["MANIFEST", "SUCCESS", "build", "fingerprint", "identity", "read_published"]

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"


def fingerprint(root: Location, files: Sequence[str]) -> str:
    """The fingerprint of the source files a reader read."""
    return listing_fingerprint((name, root.info(name)) for name in files)


def identity(source: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """What makes two conversions the same conversion, as it reads back from JSON."""
    same = {"source": {k: source[k] for k in ("url", "format", "fingerprint")}, "options": options}
    return dict(json.loads(json.dumps(same)))


def build(
    source: dict[str, Any],
    options: dict[str, Any],
    files: Sequence[FileRecord],
    report: dict[str, Any],
) -> bytes:
    manifest = {
        "ckptflow_version": __version__,
        "source": source,
        "options": options,
        "files": {
            r.name: {"size": r.size_bytes, "sha256": r.sha256}
            for r in sorted(files, key=lambda r: r.name)
        },
        "report": report,
    }
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def read_published(root: Location) -> dict[str, Any] | None:
    """The manifest of a complete publication (marker present), else None."""
    if not (root.exists(SUCCESS) and root.exists(MANIFEST)):
        return None
    try:
        parsed = json.loads(root.read_text(MANIFEST))
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
