"""The lock object on an object store (see lock.py) and the version of it last seen: every
change is conditional on that version (S3: If-None-Match to create, If-Match on the ETag to
refresh, take over and remove), so exactly one run takes a stale lock over and a holder that
lost it learns so at its next heartbeat. Stores without conditional writes (memory://) compare
a hash of the bytes, then write: two steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

from ckpt_core.io import retry
from ckpt_core.io.storage import Location

__all__ = ["MAX_LOCK_BYTES", "Conflict", "LockObject", "parse_owner"]

MAX_LOCK_BYTES = 64 * 1024  # an owner record is ~150 bytes


def parse_owner(data: bytes) -> dict[str, Any] | None:
    """The owner record a lock holds, or None when it is unreadable (being written, or junk)."""
    try:
        parsed = json.loads(data or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


class Conflict(Exception):
    """A conditional write or delete found the lock changed since we last saw it."""


class LockObject:
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
            return parse_owner(data), hashlib.sha256(data).hexdigest()
        from fsspec.asyn import sync

        fs = self.parent.fs
        bucket, key, _ = fs.split_path(self.where)

        async def get() -> tuple[bytes, str]:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return bytes(await body.read(MAX_LOCK_BYTES)), str(response["ETag"])

        data, etag = retry.call(self.where, lambda: sync(fs.loop, get))
        return parse_owner(data), etag

    def create(self, record: dict[str, Any]) -> str:
        """FileExistsError when a lock is there."""
        return self._put(record, {"IfNoneMatch": "*"}, None)

    def replace(self, record: dict[str, Any], version: str) -> str:
        """Write over the version we saw, or `Conflict` when it changed (or is gone)."""
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
            raise Conflict from e
        return str(response["ETag"])

    def remove(self, version: str) -> None:
        """Delete the lock if it is still the version we saw; leave anyone else's."""
        if not self.s3:
            with contextlib.suppress(Conflict, FileNotFoundError):
                self._same_or_conflict(version)
                self.parent.remove(self.name)
            return
        fs = self.parent.fs
        bucket, key, _ = fs.split_path(self.where)
        with contextlib.suppress(Conflict, FileNotFoundError):
            try:
                retry.call(
                    self.where,
                    lambda: fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version),
                )
            except OSError as e:
                if not _precondition_failed(e):
                    raise
                raise Conflict from e

    def _same_or_conflict(self, version: str) -> None:
        try:
            if self.read()[1] != version:
                raise Conflict
        except FileNotFoundError as e:
            raise Conflict from e


def _precondition_failed(error: BaseException) -> bool:
    """s3fs turns a failed If-Match into OSError(EINVAL) (a missing key into FileNotFoundError);
    botocore's response, kept as the cause, says which."""
    if isinstance(error, FileNotFoundError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return bool(response.get("Error", {}).get("Code") == "PreconditionFailed" or status == 412)
