"""One writer per destination. Two conversions to one destination at the same time: the second
waits (up to `wait_seconds`) or fails with a message naming the holder; files never interleave.

Locally the lock is `fcntl.flock` on `.NAME.ckptflow-lock` beside the destination: the kernel
drops it when the holder dies (SIGKILL included), so a stale lock cannot exist. On an object
store it is a create-only object (a conditional PUT, If-None-Match) at the same place, holding
the owner (id, host, pid) and a heartbeat the holder refreshes. A lock is stale, and is broken,
when its holder ran on this host and its process is gone, or when its heartbeat is older than
`stale_seconds` (default 10 minutes; CKPTFLOW_LOCK_STALE_SECONDS): a holder killed on another
machine blocks the destination until then. Two runs breaking one stale lock at the same instant
can both proceed; the create-only `_SUCCESS` marker still lets exactly one of them publish.
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

from ckpt_core.errors import PublishError
from ckpt_core.io.storage import Location

__all__ = [
    "LOCK_SUFFIX",
    "POLL_SECONDS",
    "destination_lock",
    "lock_parent",
    "stale_seconds_default",
]

LOCK_SUFFIX = ".ckptflow-lock"
POLL_SECONDS = 0.2


def stale_seconds_default() -> float:
    return float(os.environ.get("CKPTFLOW_LOCK_STALE_SECONDS", "600"))


def _owner() -> dict[str, Any]:
    return {
        "owner": uuid.uuid4().hex,
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
    dst: Location, wait_seconds: float = 0.0, stale_seconds: float | None = None
) -> Iterator[None]:
    if dst.is_local:
        with _local_lock(dst, wait_seconds):
            yield
    else:
        with _object_lock(dst, wait_seconds, stale_seconds or stale_seconds_default()):
            yield


@contextlib.contextmanager
def _local_lock(dst: Location, wait_seconds: float) -> Iterator[None]:
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
        os.write(fd, json.dumps(_owner()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still holding it, so no one can hold the removed inode
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
        parsed = json.loads(parent.read_bytes(name) or b"null")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


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
def _object_lock(dst: Location, wait_seconds: float, stale_seconds: float) -> Iterator[None]:
    parent, name = lock_parent(dst)
    owner = _owner()
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            parent.put_bytes(name, json.dumps(owner).encode(), create_only=True)
            break
        except FileExistsError:
            held = _read_owner(parent, name)
            if _is_stale(held, stale_seconds):
                parent.remove(name)
                continue
            if time.monotonic() >= deadline:
                raise _busy(dst, held, name) from None
            time.sleep(POLL_SECONDS)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(parent, name, owner, stop, stale_seconds / 4), daemon=True
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        held = _read_owner(parent, name)
        if held is not None and held.get("owner") == owner["owner"]:
            parent.remove(name)


def _heartbeat(
    parent: Location, name: str, owner: dict[str, Any], stop: threading.Event, every: float
) -> None:
    while not stop.wait(every):
        held = _read_owner(parent, name)
        if held is None or held.get("owner") != owner["owner"]:
            return  # broken by someone who judged us stale: the final marker still guards
        owner["heartbeat"] = time.time()
        with contextlib.suppress(Exception):
            parent.put_bytes(name, json.dumps(owner).encode())
