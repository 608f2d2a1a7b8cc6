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
every change to the lock object (lock_object.py) is conditional on S3 (created with
If-None-Match, refreshed, taken over and removed with If-Match on the ETag last seen), so
exactly one run takes a stale lock over and a holder that lost it learns so at its next
heartbeat instead of writing over the new owner. The owner id is the fencing token: `check_held`
re-reads the lock and raises `LockLostError` when it no longer names the caller, and publishing
calls it before every write batch, before publishing and before any cleanup
(`pipeline.publish`). Stores without conditional writes (memory://) compare and write in two
steps.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ckpt_core.errors import DestinationBusyError, LockLostError, PublishError
from ckpt_core.io.lock_object import MAX_LOCK_BYTES, Conflict, LockObject, parse_owner
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


def _busy(dst: Location, owner: dict[str, Any] | None, lock_name: str) -> DestinationBusyError:
    return DestinationBusyError(
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
        return parse_owner(_read_local(parent.file(name)))
    return _read_owner(parent, name)


def _read_local(path: str) -> bytes:
    """The lock file's bytes, never through a link planted at its name (nor a FIFO's wait)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return os.read(fd, MAX_LOCK_BYTES)
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


def _read_owner(parent: Location, name: str) -> dict[str, Any] | None:
    try:
        return parse_owner(parent.read_bytes(name))
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


@contextlib.contextmanager
def _object_lock(
    dst: Location, wait_seconds: float, stale_seconds: float, owner_id: str
) -> Iterator[None]:
    parent, name = lock_parent(dst)
    lock = LockObject(parent, name)
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
            except Conflict:
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
    lock: LockObject,
    owner: dict[str, Any],
    state: dict[str, str],
    stop: threading.Event,
    every: float,
) -> None:
    while not stop.wait(every):
        owner["heartbeat"] = time.time()
        try:
            state["version"] = lock.replace(owner, state["version"])
        except Conflict:
            # Taken over by a run that judged us stale: every later check_held refuses.
            _LOST.add(str(owner["owner"]))
            return
        except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
            continue
