"""Publishing: nothing at the destination looks complete until all of it is there, and a run that
died halfway is resumed, not redone.

Local filesystems: files go to a staging directory beside the destination, which is renamed
into place in one step. Object stores (no rename): files go to the destination itself, data
first, then the index, then manifest.json, and the `_SUCCESS` marker last, created with
create-only semantics (If-None-Match on S3); a destination without the marker is incomplete, and
ckptflow's readers require the marker. An `--overwrite` to an object store stages beside the
destination like a local one (`.NAME.ckptflow-staging/`), so the previous output stays whole
and readable until the new one is complete and verified; then `_swap_in` marks the destination
incomplete, copies the files over on the server (manifest last), removes the old files the new
output lacks, creates `_SUCCESS`, and removes the staging prefix. A crash during the swap leaves
the staging prefix with its marker and done-records: a rerun resumes it and swaps again.

Fencing: every write batch, the publish and every cleanup first checks that this run still
holds the destination's lock (`io.lock.check_held` with the plan's owner id): a run whose lock
was taken over stops with `LockLostError` and removes nothing, since the destination may now
hold the new owner's output.

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
from functools import partial

from ckpt_core.errors import (
    CkptError,
    LockLostError,
    PublishError,
    StorageFullError,
    StorageUnavailableError,
)
from ckpt_core.io import retry
from ckpt_core.io.lock import check_held, new_owner_id
from ckpt_core.io.storage import Location, join_url, split_url
from ckpt_core.pipeline.manifest import MANIFEST, SUCCESS, read_published
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
    owner: str = ""  # fencing token: the lock this plan's run holds (empty: no lock, by hand)

    @property
    def staged(self) -> bool:
        return self.work_url != self.dst_url


def target_for(dst: Location, *, overwrite: bool = False) -> Target:
    """Locally always staged; on an object store in place, except an overwrite (staged, so
    that a failed run never destroys the previous output)."""
    if dst.is_local:
        parent, name = posixpath.split(dst.path)
        return Target(dst.url, posixpath.join(parent, f".{name}{STAGING_SUFFIX}"), new_owner_id())
    if not overwrite:
        return Target(dst.url, dst.url, new_owner_id())
    if not split_url(dst.url)[1]:
        raise PublishError(
            f"{dst.url}: a whole bucket cannot be overwritten safely; "
            "choose a prefix inside it (s3://bucket/name)"
        )
    return Target(dst.url, _remote_staging(dst.url), new_owner_id())


def _remote_staging(dst_url: str) -> str:
    parent, name = split_url(dst_url)
    return join_url(parent, f".{name}{STAGING_SUFFIX}")


def _fence(target: Target) -> None:
    """This run still holds the destination (raises LockLostError if not)."""
    check_held(Location(target.dst_url), target.owner)


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
    """In-place publish order is `_SUCCESS` (create-only), then INCOMPLETE removed (a swap
    removes its staging prefix between the two): a crash between leaves a complete output with a
    stale marker, which goes here (call under the lock)."""
    if dst.exists(SUCCESS) and dst.exists(INCOMPLETE):
        if not dst.is_local and split_url(dst.url)[1]:
            Location(_remote_staging(dst.url)).remove(recursive=True)
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
    _fence(target)
    work = Location(target.work_url)
    if work.is_local and os.path.islink(work.path):
        raise PublishError(
            f"{work.path}: the staging directory's name is a symlink (to "
            f"{os.readlink(work.path)}); ckptflow never writes through it. Remove the link "
            "(its target is left alone) and run again"
        )
    if identity is not None and _work_identity(work) == identity:
        return work
    if work.exists():
        work.remove(SUCCESS)
        work.remove(recursive=True)
    work.fs.makedirs(work.path, exist_ok=True)
    work.put_bytes(INCOMPLETE, (identity or "").encode())
    return work


def ensure_unfinished(target: Target) -> None:
    """Before each write batch: this run still holds the destination, and work on an object
    store still carries its marker. A store that lost it (a restarted server, a lifecycle rule)
    would otherwise collect shards that no run recognises as its own."""
    _fence(target)
    work = Location(target.work_url)
    if not work.is_local and not work.exists(INCOMPLETE):
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
    rename into place, (object store, staged) a swap. `files`: every file the output must hold
    (the manifest's list)."""
    _fence(target)
    work = Location(target.work_url)
    if files is not None:
        _sweep(work, {f.name for f in files})
        _check_present(work, files)
    if target.staged and not work.is_local:
        _swap_in(target, work, files)
        return
    work.remove(DONE_DIR, recursive=True)
    if target.staged:
        work.remove(INCOMPLETE)
    _mark_success(target, work)
    if not target.staged:
        work.remove(INCOMPLETE)
        return
    dst = Location(target.dst_url)
    old = dst.path + ".ckptflow-old"
    _fence(target)  # the name may be another run's output by now: never move it aside then
    if os.path.lexists(dst.path):
        # Overwrite: the old output moves aside, the new one takes its name, the old one goes.
        os.rename(dst.path, old)
    os.makedirs(os.path.dirname(dst.path) or ".", exist_ok=True)
    os.rename(work.path, dst.path)
    if os.path.islink(old) or os.path.isfile(old):
        os.remove(old)  # a link goes, never what it points at
    elif os.path.exists(old):
        shutil.rmtree(old)


def _swap_in(target: Target, work: Location, files: Sequence[FileRecord] | None) -> None:
    """The staged output, complete and verified, replaces the destination's (see the module
    docstring). The staging prefix keeps its marker and done-records until the destination's
    `_SUCCESS` exists, so a crash at any step is resumed by a rerun."""
    dst = Location(target.dst_url)
    names = [f.name for f in files] if files is not None else sorted(_listed(work, BOOKKEEPING))
    names.sort(key=lambda n: n == MANIFEST)  # the manifest last
    _fence(target)
    dst.put_bytes(INCOMPLETE, work.read_bytes(INCOMPLETE))  # no longer reads as complete
    dst.remove(SUCCESS)
    for name in names:
        _fence(target)
        source, copy = work.file(name), dst.file(name)
        retry.call(copy, partial(work.fs.cp_file, source, copy))
    _fence(target)
    for relative, path in _listed(work=dst, skip=(INCOMPLETE,)).items():
        if relative not in names:
            retry.call(path, partial(dst.fs.rm, path))  # the old output's files the new one lacks
    if files is not None:
        _check_present(dst, files)
    _fence(target)
    _mark_success(target, dst)
    work.remove(recursive=True)  # before the marker goes: `complete_interrupted` knows
    dst.remove(INCOMPLETE)


def _mark_success(target: Target, where: Location) -> None:
    """`_SUCCESS`, created only where none is: one there means another run published first."""
    try:
        where.put_bytes(SUCCESS, b"", create_only=True)
    except FileExistsError as e:
        raise PublishError(
            f"{target.dst_url}: another run published this destination while this one was "
            "writing it; nothing of this run was published over it"
        ) from e


def _listed(work: Location, skip: Sequence[str] = ()) -> dict[str, str]:
    """Every file below `work` as {name relative to it: the listed path}, for names whose top
    part is not in `skip`. Names are cut from the listing by prefix, never normalised
    (`..` in an object key is part of its name): a removal uses the listed path itself, so it
    cannot reach outside `work`."""
    prefix = work.path.rstrip("/") + "/"
    found: dict[str, str] = {}
    for path in retry.call(work.path, lambda: work.fs.find(work.path)):
        if not path.startswith(prefix):
            continue  # never expected from find(); never touched
        relative = path[len(prefix) :]
        if relative.split("/", 1)[0] not in skip:
            found[relative] = path
    return found


def _sweep(work: Location, expected: set[str]) -> None:
    """Leftovers of an interrupted attempt (a half-written temporary, a file of a step that
    wrote differently last time) never reach the output."""
    for relative, path in _listed(work, BOOKKEEPING).items():
        if relative not in expected and relative != SUCCESS:
            # e.g. a model-00002-of-00005.safetensors.ckptflow-part
            retry.call(path, partial(work.fs.rm, path))


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
    """After a failure that a rerun cannot fix: the unfinished work goes (marker first); never
    after this run lost the destination's lock (LockLostError: it may be another run's now)."""
    _fence(target)
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
    if not resumable(error) and not isinstance(error, LockLostError):
        with contextlib.suppress(OSError, LockLostError):
            discard(target)
