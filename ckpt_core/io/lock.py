"""One writer per destination. Two conversions to one destination at the same time: the second
waits (up to `wait_seconds`) or fails with a message naming the holder; files never interleave.

Locally the lock is `fcntl.flock` on `.NAME.ckptflow-lock` beside the destination: the kernel
drops it when the holder dies (SIGKILL included), so a stale lock cannot exist. On an object
store it is an object at the same place, holding the owner (id, host, pid) and a heartbeat the
holder refreshes. A lock is stale, and is taken over, when its holder ran on this host and its
process is gone, or when its heartbeat is older than `stale_seconds` (default 10 minutes;
CKPTFLOW_LOCK_STALE_SECONDS): a holder killed on another machine blocks the destination until
then.

Losing a lock (a stalled process, a host whose clock is behind) must not let two runs write:
every change to the lock object is conditional on S3 (created with If-None-Match, refreshed,
taken over and removed with If-Match on the ETag last seen), so exactly one run takes a stale
lock over and a holder that lost it learns so at its next heartbeat instead of writing over the
new owner. The owner id is the fencing token: `check_held` re-reads the lock and raises
`LockLostError` when it no longer names the caller, and publishing calls it before every write
batch, before publishing and before any cleanup (`pipeline.publish`). Stores without
conditional writes (memory://) compare and write in two steps.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ckpt_core.errors import LockLostError, PublishError
from ckpt_core.io import retry
from ckpt_core.io.storage import Location

__all__ = [
    "LOCK_SUFFIX",
    "POLL_SECONDS",
    "check_held",
    "destination_lock",
    "lock_parent",
    "new_owner_id",
    "stale_seconds_default",
    "unlocked",
]

LOCK_SUFFIX = ".ckptflow-lock"
POLL_SECONDS = 0.2
_MAX_LOCK_BYTES = 64 * 1024  # an owner record is ~150 bytes
_LOST: set[str] = set()  # owner ids this process learned it no longer holds
_UNLOCKED: set[str] = set()  # owner ids of steps driven by hand, without a lock (`unlocked`)


def stale_seconds_default() -> float:
    return float(os.environ.get("CKPTFLOW_LOCK_STALE_SECONDS", "600"))


def new_owner_id() -> str:
    return uuid.uuid4().hex


def _owner(owner_id: str) -> dict[str, Any]:
    return {
        "owner": owner_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "heartbeat": time.time(),
    }


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another ckptflow run"
    age = time.time() - float(owner.get("heartbeat", 0))
    return (
        f"another ckptflow run (pid {owner.get('pid')} on {owner.get('host')}, "
        f"last heartbeat {age:.0f}s ago)"
    )


def _busy(dst: Location, owner: dict[str, Any] | None, lock_name: str) -> PublishError:
    return PublishError(
        f"{dst.url}: {_describe(owner)} is writing this destination; wait for it to finish and "
        f"run again (a rerun then finds the output or resumes it). A lock left by a crashed run "
        f"elsewhere is {lock_name} beside the destination; it expires on its own"
    )


def lock_parent(dst: Location) -> tuple[Location, str]:
    """The directory holding the destination, and the lock file's name in it."""
    parent, name = posixpath.split(dst.path.rstrip("/"))
    return Location(dst.fs.unstrip_protocol(parent or "/")), f".{name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def destination_lock(
    dst: Location,
    wait_seconds: float = 0.0,
    stale_seconds: float | None = None,
    *,
    owner: str | None = None,
) -> Iterator[None]:
    """Hold the destination; `owner`: the fencing token `check_held` compares (a fresh one if
    not given)."""
    owner_id = owner or new_owner_id()
    _LOST.discard(owner_id)
    _UNLOCKED.discard(owner_id)
    if dst.is_local:
        with _local_lock(dst, wait_seconds, owner_id):
            yield
    else:
        stale = stale_seconds or stale_seconds_default()
        with _object_lock(dst, wait_seconds, stale, owner_id):
            yield


def unlocked(owner: str) -> None:
    """Steps of `owner` are driven by hand in this process without taking the lock (tests,
    debugging): `check_held` has nothing to compare for them."""
    _UNLOCKED.add(owner)


def check_held(dst: Location, owner: str) -> None:
    """Raise `LockLostError` unless the destination's lock still names `owner` (no-op for an
    empty owner or one driven `unlocked`: no lock was taken)."""
    if not owner or owner in _UNLOCKED:
        return
    parent, name = lock_parent(dst)
    held = _current_owner(parent, name)
    if owner not in _LOST and held is not None and held.get("owner") == owner:
        return
    _LOST.add(owner)
    now = "is gone" if held is None else f"is now held by {_describe(held)}"
    raise LockLostError(
        f"{dst.url}: this run no longer holds the destination's lock ({name} {now}: another run "
        "judged this one stale and took over, or the store lost the lock); it stopped writing "
        "and removed nothing. Check the destination and run again if it is not what you want"
    )


def _current_owner(parent: Location, name: str) -> dict[str, Any] | None:
    if parent.is_local:
        return _parse(_read_local(parent.file(name)))
    return _read_owner(parent, name)


def _read_local(path: str) -> bytes:
    """The lock file's bytes, never through a link planted at its name (nor a FIFO's wait)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return os.read(fd, _MAX_LOCK_BYTES)
    except OSError:
        return b""
    finally:
        os.close(fd)


@contextlib.contextmanager
def _local_lock(dst: Location, wait_seconds: float, owner_id: str) -> Iterator[None]:
    parent, name = lock_parent(dst)
    os.makedirs(parent.path, exist_ok=True)
    path = parent.file(name)
    deadline = time.monotonic() + wait_seconds
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                raise _busy(dst, _read_owner(parent, name), name) from None
            time.sleep(POLL_SECONDS)
            continue
        # The previous holder may have unlinked the file between our open and our flock:
        # then we hold a lock on a file nobody else can see, so start over.
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner(owner_id)).encode())
        yield
    finally:
        try:
            # Only our own file: one that replaced it at the name (after someone removed ours)
            # belongs to the run holding it now.
            if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                os.remove(path)  # while still holding it, so no one can hold the removed inode
        except FileNotFoundError:
            pass
        os.close(fd)


def _open_lock(path: str) -> int:
    """The lock file itself, never what a link planted at its name leads to: O_NOFOLLOW refuses
    a symlink, and a second hard link (someone else's file) is refused before any write."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise _planted(path, "a symlink") from None
    if os.fstat(fd).st_nlink > 1:
        os.close(fd)
        raise _planted(path, "a hard link to another file")
    return fd


def _planted(path: str, what: str) -> PublishError:
    return PublishError(
        f"{path}: the destination's lock file is {what}; ckptflow never writes through it. "
        "Remove it (nothing of ckptflow's is lost) and run again"
    )


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(data or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _read_owner(parent: Location, name: str) -> dict[str, Any] | None:
    try:
        return _parse(parent.read_bytes(name))
    except FileNotFoundError:
        return None


def _is_stale(owner: dict[str, Any] | None, stale_seconds: float) -> bool:
    if owner is None:
        return False  # unreadable: being written this instant; look again
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
    return time.time() - float(owner.get("heartbeat", 0)) > stale_seconds


class _Conflict(Exception):
    """A conditional write or delete found the lock changed since we last saw it."""


class _LockObject:
    """The lock object and the version of it last seen: the ETag on S3 (every change is
    conditional on it), elsewhere a hash of its bytes (compared, then written: two steps)."""

    def __init__(self, parent: Location, name: str) -> None:
        self.parent, self.name = parent, name
        self.where = parent.file(name)
        self.s3 = hasattr(parent.fs, "_call_s3")

    def read(self) -> tuple[dict[str, Any] | None, str]:
        """The owner record and its version; FileNotFoundError when there is no lock."""
        if not self.s3:
            data = self.parent.read_bytes(self.name)
            return _parse(data), hashlib.sha256(data).hexdigest()
        from fsspec.asyn import sync

        fs = self.parent.fs
        bucket, key, _ = fs.split_path(self.where)

        async def get() -> tuple[bytes, str]:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return bytes(await body.read(_MAX_LOCK_BYTES)), str(response["ETag"])

        data, etag = retry.call(self.where, lambda: sync(fs.loop, get))
        return _parse(data), etag

    def create(self, record: dict[str, Any]) -> str:
        """FileExistsError when a lock is there."""
        return self._put(record, {"IfNoneMatch": "*"}, None)

    def replace(self, record: dict[str, Any], version: str) -> str:
        """Write over the version we saw, or `_Conflict` when it changed (or is gone)."""
        return self._put(record, {"IfMatch": version}, version)

    def _put(self, record: dict[str, Any], condition: dict[str, str], seen: str | None) -> str:
        data = json.dumps(record).encode()
        if not self.s3:
            if seen is None:
                self.parent.put_bytes(self.name, data, create_only=True)
            else:
                self._same_or_conflict(seen)
                self.parent.put_bytes(self.name, data)
            return hashlib.sha256(data).hexdigest()
        fs = self.parent.fs
        bucket, key, _ = fs.split_path(self.where)
        try:
            response = retry.call(
                self.where,
                lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition),
            )
        except OSError as e:
            if seen is None or isinstance(e, FileExistsError) or not _precondition_failed(e):
                raise  # a create's FileExistsError: someone holds it; anything else: as it is
            raise _Conflict from e
        return str(response["ETag"])

    def remove(self, version: str) -> None:
        """Delete the lock if it is still the version we saw; leave anyone else's."""
        if not self.s3:
            with contextlib.suppress(_Conflict, FileNotFoundError):
                self._same_or_conflict(version)
                self.parent.remove(self.name)
            return
        fs = self.parent.fs
        bucket, key, _ = fs.split_path(self.where)
        with contextlib.suppress(_Conflict, FileNotFoundError):
            try:
                retry.call(
                    self.where,
                    lambda: fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version),
                )
            except OSError as e:
                if not _precondition_failed(e):
                    raise
                raise _Conflict from e

    def _same_or_conflict(self, version: str) -> None:
        try:
            if self.read()[1] != version:
                raise _Conflict
        except FileNotFoundError as e:
            raise _Conflict from e


def _precondition_failed(error: BaseException) -> bool:
    """s3fs turns a failed If-Match into OSError(EINVAL) (a missing key into FileNotFoundError);
    botocore's response, kept as the cause, says which."""
    if isinstance(error, FileNotFoundError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return bool(response.get("Error", {}).get("Code") == "PreconditionFailed" or status == 412)


@contextlib.contextmanager
def _object_lock(
    dst: Location, wait_seconds: float, stale_seconds: float, owner_id: str
) -> Iterator[None]:
    parent, name = lock_parent(dst)
    lock = _LockObject(parent, name)
    owner = _owner(owner_id)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            version = lock.create(owner)
            break
        except FileExistsError:
            pass
        try:
            held, seen = lock.read()
        except FileNotFoundError:
            continue  # released this instant: create again
        if _is_stale(held, stale_seconds):
            try:
                version = lock.replace(owner, seen)  # one taker wins; a fresh beat beats us
                break
            except _Conflict:
                continue
        if time.monotonic() >= deadline:
            raise _busy(dst, held, name) from None
        time.sleep(POLL_SECONDS)
    state = {"version": version}
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(lock, owner, state, stop, stale_seconds / 4), daemon=True
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if owner_id not in _LOST:
            lock.remove(state["version"])


def _heartbeat(
    lock: _LockObject,
    owner: dict[str, Any],
    state: dict[str, str],
    stop: threading.Event,
    every: float,
) -> None:
    while not stop.wait(every):
        owner["heartbeat"] = time.time()
        try:
            state["version"] = lock.replace(owner, state["version"])
        except _Conflict:
            # Taken over by a run that judged us stale: every later check_held refuses.
            _LOST.add(str(owner["owner"]))
            return
        except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
            continue
