"""Publishing: nothing at the destination looks complete until all of it is there, and a run that
died halfway is resumed, not redone.

Local filesystems: files go to a staging directory beside the destination, which is renamed
into place in one step. Object stores (no rename): files go to the destination itself, data
first, then the index, then manifest.json, and the `_SUCCESS` marker last, created with
create-only semantics (If-None-Match on S3); a destination without the marker is incomplete, and
ckptflow's readers require the marker.

Resume: the work directory holds `.ckptflow-incomplete` with the plan's identity, and a small
done-record (size, sha256) per finished shard in `.ckptflow-done/`. Each shard appears whole
(a local temporary name renamed when complete; an object when its upload completes) before its
record is written. A rerun of the same plan keeps every shard whose record matches and whose
bytes hash to it, and rewrites the rest; a different plan starts from a clean directory. The
bookkeeping is removed before the marker, so the published files are the same as an
uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt_core.errors import CkptError, PublishError, StorageFullError, StorageUnavailableError
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.manifest import SUCCESS, read_published
from ckpt_core.pipeline.writer import FileRecord, hash_file

__all__ = [
    "BOOKKEEPING",
    "DONE_DIR",
    "INCOMPLETE",
    "STAGING_SUFFIX",
    "Target",
    "abandon",
    "check_destination",
    "complete_interrupted",
    "discard",
    "ensure_unfinished",
    "finalize",
    "finished",
    "prepare",
    "record_done",
    "refuse_inside",
    "resumable",
    "target_for",
]

STAGING_SUFFIX = ".ckptflow-staging"
INCOMPLETE = ".ckptflow-incomplete"  # marks unfinished work; holds the plan identity
DONE_DIR = ".ckptflow-done"  # one record per finished shard
BOOKKEEPING = (INCOMPLETE, DONE_DIR)


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
    _refuse_not_a_directory(dst, overwrite)
    if not dst.exists():
        return False
    published = read_published(dst)
    if (
        published is not None
        and {"source": _source_key(published), "options": published.get("options")} == identity
    ):
        # A publish that died between its marker and dropping INCOMPLETE is not done until
        # `complete_interrupted` (under the lock) drops the stale marker.
        return not dst.exists(INCOMPLETE)
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


def complete_interrupted(dst: Location) -> None:
    """In-place publish order is `_SUCCESS` (create-only), then INCOMPLETE removed: a crash
    between leaves a complete output with a stale marker, which goes here (call under the lock)."""
    if dst.exists(SUCCESS) and dst.exists(INCOMPLETE):
        dst.remove(INCOMPLETE)


def _refuse_not_a_directory(dst: Location, overwrite: bool) -> None:
    """A file, or a symlink (even to a directory), at the destination's name is not an output:
    refused without --overwrite; with it, only the name is replaced (finalize never follows it)."""
    link = dst.is_local and os.path.islink(dst.path)
    if overwrite or not (link or (dst.exists() and not dst.isdir())):
        return
    what = f"a symlink (to {os.readlink(dst.path)})" if link else "a file"
    raise PublishError(
        f"{dst.url}: is {what}, not a ckptflow output; nothing was changed. Choose another "
        "destination, or pass --overwrite to replace that name (a link's target is left alone)"
    )


def _source_key(published: dict[str, object]) -> dict[str, object]:
    source = published.get("source")
    if not isinstance(source, dict):
        return {}
    return {k: source.get(k) for k in ("url", "format", "fingerprint")}


def refuse_inside(dst: Location, protected: Location, role: str) -> None:
    """The source checkpoint and the base model are never written."""
    if type(dst.fs) is not type(protected.fs):
        return
    a, b = _real(dst), _real(protected)
    if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
        raise PublishError(
            f"{dst.url}: overlaps the {role} {protected.url}, which ckptflow never writes"
        )


def _real(where: Location) -> str:
    """Locally the path with every symlink resolved (a destination reached through a link into
    the source is inside it); realpath resolves the longest existing ancestor of a new path."""
    path = where.path.rstrip("/") or "/"
    return os.path.realpath(path) if where.is_local else path


def prepare(target: Target, identity: str | None = None) -> Location:
    """A place to write into: the unfinished work of the same plan (`identity`) is kept for
    resuming; anything else there is removed first (the marker before the rest)."""
    work = Location(target.work_url)
    if identity is not None and _work_identity(work) == identity:
        return work
    if work.exists():
        work.remove(SUCCESS)
        work.remove(recursive=True)
    work.fs.makedirs(work.path, exist_ok=True)
    work.put_bytes(INCOMPLETE, (identity or "").encode())
    return work


def ensure_unfinished(target: Target) -> None:
    """Before each in-place write: the work must still carry its marker. An object store that
    lost it (a restarted server, a lifecycle rule) would otherwise collect shards that no run
    recognises as its own."""
    work = Location(target.work_url)
    if not target.staged and not work.exists(INCOMPLETE):
        raise PublishError(
            f"{work.url}: its {INCOMPLETE} marker vanished while writing (the store lost data); "
            "nothing was published: run the conversion again"
        )


def _work_identity(work: Location) -> str | None:
    try:
        if not work.exists(INCOMPLETE) or work.exists(SUCCESS):
            return None
        return work.read_text(INCOMPLETE)
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _record_name(filename: str) -> str:
    return f"{DONE_DIR}/{filename}.json"


def record_done(work: Location, record: FileRecord) -> None:
    """Written only after the shard is whole at its final name."""
    data = json.dumps({"size": record.size_bytes, "sha256": record.sha256}, sort_keys=True)
    work.put_bytes(_record_name(record.name), data.encode())


def finished(work: Location, filename: str) -> FileRecord | None:
    """The shard's record if a previous attempt finished it and its bytes still hash to it."""
    try:
        recorded = json.loads(work.read_text(_record_name(filename)))
        size, sha256 = int(recorded["size"]), str(recorded["sha256"])
    except (FileNotFoundError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if not work.exists(filename) or work.size(filename) != size:
        return None
    actual = hash_file(work, filename)
    return actual if actual.sha256 == sha256 else None


def finalize(target: Target, files: Sequence[FileRecord] | None = None) -> None:
    """Check the files, drop the bookkeeping, marker last (create-only), then (locally) one
    rename into place. `files`: every file the output must hold (the manifest's list)."""
    work = Location(target.work_url)
    if files is not None:
        _sweep(work, {f.name for f in files})
        _check_present(work, files)
    work.remove(DONE_DIR, recursive=True)
    if target.staged:
        work.remove(INCOMPLETE)
    try:
        work.put_bytes(SUCCESS, b"", create_only=True)
    except FileExistsError as e:
        raise PublishError(
            f"{target.dst_url}: another run published this destination while this one was "
            "writing it; nothing of this run was published over it"
        ) from e
    if not target.staged:
        work.remove(INCOMPLETE)
        return
    dst = Location(target.dst_url)
    old = dst.path + ".ckptflow-old"
    if os.path.lexists(dst.path):
        # Overwrite: the old output moves aside, the new one takes its name, the old one goes.
        os.rename(dst.path, old)
    os.makedirs(os.path.dirname(dst.path) or ".", exist_ok=True)
    os.rename(work.path, dst.path)
    if os.path.islink(old) or os.path.isfile(old):
        os.remove(old)  # a link goes, never what it points at
    elif os.path.exists(old):
        shutil.rmtree(old)


def _sweep(work: Location, expected: set[str]) -> None:
    """Leftovers of an interrupted attempt (a half-written temporary, a file of a step that
    wrote differently last time) never reach the output."""
    keep = expected | {SUCCESS, *BOOKKEEPING}
    for path in work.fs.find(work.path):
        relative = posixpath.relpath(path, work.path)
        top = relative.split("/", 1)[0]
        if relative not in keep and top not in BOOKKEEPING:
            work.remove(relative)  # e.g. a model-00002-of-00005.safetensors.ckptflow-part


def _check_present(work: Location, files: Sequence[FileRecord]) -> None:
    for record in files:
        try:
            size = work.size(record.name)
        except FileNotFoundError:
            size = -1
        if size != record.size_bytes:
            raise PublishError(
                f"{work.file(record.name)}: expected {record.size_bytes} bytes before publishing, "
                f"found {'no file' if size < 0 else f'{size} bytes'} (the store lost a write?); "
                "nothing was published, run again to rewrite it"
            )


def discard(target: Target) -> None:
    """After a failure that a rerun cannot fix: the unfinished work goes (marker first)."""
    work = Location(target.work_url)
    with contextlib.suppress(FileNotFoundError):
        work.remove(SUCCESS)
        work.remove(recursive=True)


def resumable(error: BaseException) -> bool:
    """Interrupts and storage trouble keep the finished shards for a rerun; a bad input or a
    failed verification does not (a rerun would only meet the same failure)."""
    kept = (StorageUnavailableError, StorageFullError)  # a full disk: finished shards are valid
    return isinstance(error, kept) or not isinstance(error, CkptError)


def abandon(target: Target, error: BaseException) -> None:
    """After a failure: keep resumable work (nothing of it looks complete), discard the rest
    (where the store lets it: a read-only one keeps what it has, and the error says why)."""
    if not resumable(error):
        with contextlib.suppress(OSError):
            discard(target)
