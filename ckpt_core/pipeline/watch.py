"""Finding checkpoints under a root that have no published conversion yet (for the scheduled
`watch` flow). Planning only: no conversion happens here."""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_core.errors import CkptError
from ckpt_core.formats.registry import detect
from ckpt_core.io.storage import Location, join_url

__all__ = ["Pending", "find_pending"]


@dataclass(frozen=True)
class Pending:
    src: str
    dst: str
    format: str


def find_pending(root_url: str, out_root_url: str) -> list[Pending]:
    """Each directory directly under `root_url` that holds a readable checkpoint and whose
    destination `out_root_url/<name>` is missing or incomplete (no `_SUCCESS`)."""
    from ckpt_core.pipeline.manifest import SUCCESS

    root = Location(root_url)
    pending: list[Pending] = []
    for name in root.listdir():
        if name.startswith("."):
            continue
        src = join_url(root_url, name)
        if not Location(src).isdir():
            continue
        try:
            fmt = detect(src)
        except CkptError:
            continue  # not a checkpoint (logs, optimizer-only dirs): not ours to convert
        dst = join_url(out_root_url, name)
        if not Location(dst).exists(SUCCESS):
            pending.append(Pending(src, dst, fmt.name))
    return pending
