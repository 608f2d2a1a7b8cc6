"""Publishing: nothing at the destination looks complete until all of it is there.

Local filesystems: files go to a staging directory beside the destination, which is renamed
into place in one step. Object stores (no rename): files go to the destination itself, data
first, then the index, then manifest.json, and the `_SUCCESS` marker last; a destination
without the marker is incomplete, and ckptflow's readers require the marker.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
from dataclasses import dataclass

from ckpt_core.errors import PublishError
from ckpt_core.manifest import SUCCESS, read_published
from ckpt_core.storage import Location

STAGING_SUFFIX = ".ckptflow-staging"
INCOMPLETE = ".ckptflow-incomplete"  # marks an in-place output that is still being written


@dataclass(frozen=True)
class Target:
    dst_url: str
    work_url: str  # where files are written before publish

    @property
    def staged(self) -> bool:
        return self.work_url != self.dst_url


def target_for(dst: Location) -> Target:
    if dst.is_local:
        parent, name = posixpath.split(dst.path)
        return Target(dst.url, posixpath.join(parent, f".{name}{STAGING_SUFFIX}"))
    return Target(dst.url, dst.url)


def check_destination(dst: Location, identity: dict[str, object], overwrite: bool) -> bool:
    """True when the destination already holds this very conversion (nothing to do)."""
    if not dst.exists():
        return False
    published = read_published(dst)
    if (
        published is not None
        and {"source": _source_key(published), "options": published.get("options")} == identity
    ):
        return True
    if overwrite:
        return False
    if published is not None:
        raise PublishError(
            f"{dst.url}: holds a different conversion (from {published.get('source', {}).get('url')}); "
            "pass --overwrite to replace it or choose another destination"
        )
    if dst.listdir() and not dst.exists(INCOMPLETE):
        raise PublishError(
            f"{dst.url}: exists and is not a ckptflow output; "
            "pass --overwrite to replace it or choose another destination"
        )
    return False


def _source_key(published: dict[str, object]) -> dict[str, object]:
    source = published.get("source")
    if not isinstance(source, dict):
        return {}
    return {k: source.get(k) for k in ("url", "format", "fingerprint")}


def refuse_inside(dst: Location, protected: Location, role: str) -> None:
    """The source checkpoint and the base model are never written."""
    if type(dst.fs) is not type(protected.fs):
        return
    a, b = dst.path.rstrip("/"), protected.path.rstrip("/")
    if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
        raise PublishError(
            f"{dst.url}: overlaps the {role} {protected.url}, which ckptflow never writes"
        )


def prepare(target: Target) -> Location:
    """A clean, empty place to write into."""
    work = Location(target.work_url)
    if work.exists():
        work.fs.rm(work.path, recursive=True)
    work.fs.makedirs(work.path, exist_ok=True)
    if not target.staged:
        work.fs.pipe_file(work.file(INCOMPLETE), b"")
    return work


def finalize(target: Target) -> None:
    """Marker last, then (locally) one rename into place."""
    work = Location(target.work_url)
    work.fs.pipe_file(work.file(SUCCESS), b"")
    if not target.staged:
        work.fs.rm(work.file(INCOMPLETE))
        return
    dst = Location(target.dst_url)
    old = dst.path + ".ckptflow-old"
    if os.path.exists(dst.path):
        # Overwrite: the old output moves aside, the new one takes its name, the old one goes.
        os.rename(dst.path, old)
    os.makedirs(os.path.dirname(dst.path) or ".", exist_ok=True)
    os.rename(work.path, dst.path)
    if os.path.exists(old):
        shutil.rmtree(old)


def discard(target: Target) -> None:
    """After a failure: staged files go; an in-place destination loses its marker only."""
    work = Location(target.work_url)
    if target.staged:
        with contextlib.suppress(FileNotFoundError):
            work.fs.rm(work.path, recursive=True)
    elif work.exists(SUCCESS):
        work.fs.rm(work.file(SUCCESS))
