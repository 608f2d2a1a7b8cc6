"""Retries for storage IO: transient failures (connection reset, timeouts, 5xx, throttling) are
retried with bounded exponential backoff; permanent ones (missing file, permission denied, a bad
file) fail at once, because retrying them only delays the message the user needs."""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ckpt_core.errors import (
    CkptError,
    DestinationBusyError,
    StorageFullError,
    StorageRefusedError,
    StorageUnavailableError,
)

__all__ = [
    "DESTINATION_ERRNOS",
    "POLICY",
    "RetryPolicy",
    "call",
    "explain",
    "is_transient",
    "set_policy",
    "worth_another_run",
]

T = TypeVar("T")
log = logging.getLogger("ckptflow.retry")

_PERMANENT: tuple[type[BaseException], ...] = (
    CkptError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# The destination refuses writes: never retried (each fails at once, `explain` says what to do).
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DESTINATION_ERRNOS = frozenset({*_FULL_ERRNOS, errno.EROFS, errno.EACCES, errno.EPERM})
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EIO,  # s3fs: InternalError / 500
    getattr(errno, "EREMOTEIO", errno.EIO),
    errno.EBUSY,  # s3fs: SlowDown / ServiceUnavailable / 503
    errno.EAGAIN,
}
# Exception class names (from botocore, aiohttp, urllib3, http.client) that mean "the network or
# the server hiccupped"; matched by name so that none of those packages must be importable.
_TRANSIENT_NAMES = (
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientPayloadError",
    "IncompleteRead",
    "ProtocolError",
    "ResponseParserError",
    "HTTPClientError",
)
_TRANSIENT_WORDS = (
    "SlowDown",
    "Throttl",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "reduce your request rate",
    "Connection reset",
    "Server disconnected",
)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # total tries, the first one included
    base_seconds: float = 0.5
    cap_seconds: float = 10.0

    def delays(self) -> Iterator[float]:
        """Exponential backoff with jitter (so that parallel tasks do not retry in lockstep)."""
        for n in range(self.attempts - 1):
            ceiling = min(self.cap_seconds, self.base_seconds * 2**n)
            yield ceiling / 2 + random.uniform(0, ceiling / 2)


def _policy_from_env() -> RetryPolicy:
    attempts = int(os.environ.get("CKPTFLOW_IO_RETRIES", "6"))
    base = float(os.environ.get("CKPTFLOW_IO_RETRY_BASE_SECONDS", "0.5"))
    return RetryPolicy(attempts=max(1, attempts), base_seconds=base)


POLICY = _policy_from_env()


def explain(error: OSError, where: str) -> StorageRefusedError:
    """A one-line message for a permanent storage error; credentials never appear in it."""
    name = error.filename or where
    if error.errno in _FULL_ERRNOS:
        limit = "a file size limit (ulimit -f)" if error.errno == errno.EFBIG else "no space left"
        return StorageFullError(
            f"{name}: {limit} ({os.strerror(error.errno or 0)}); finished shards are kept: "
            "free space (or raise the limit) and run again to resume"
        )
    if error.errno == errno.EROFS:
        return StorageRefusedError(
            f"{name}: read-only file system; choose a writable destination (nothing was published)"
        )
    what = {
        FileNotFoundError: "does not exist (check the bucket and path)",
        PermissionError: "permission denied (check the directory's permissions, or the "
        "credentials and the bucket policy)",
        IsADirectoryError: "is a directory, expected a file",
        NotADirectoryError: "is a file, expected a directory",
    }.get(type(error), "cannot be accessed")
    return StorageRefusedError(f"{name}: {what} ({type(error).__name__}: {error})")


def set_policy(policy: RetryPolicy) -> RetryPolicy:
    """Replace the process-wide policy (tests shorten the waits); returns the old one."""
    global POLICY
    old, POLICY = POLICY, policy
    return old


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(error: BaseException) -> bool:
    """True for failures a retry can fix; anything unknown counts as permanent."""
    if isinstance(error, _PERMANENT):
        return False
    for e in _chain(error):
        if isinstance(e, _PERMANENT):
            return False
        if isinstance(e, OSError) and e.errno in DESTINATION_ERRNOS:
            return False
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        names = {cls.__name__ for cls in type(e).__mro__}
        if any(name in names for name in _TRANSIENT_NAMES):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if int(status or 0) >= 500 or int(status or 0) == 429:
                return True
        if isinstance(e, OSError) and any(w in str(e) for w in _TRANSIENT_WORDS):
            return True
    return False


def worth_another_run(error: BaseException) -> bool:
    """For an orchestrator's retry of a whole step (a Prefect task): a transient error, or
    transient errors that outlasted this module's IO retries (`StorageUnavailableError`): a
    later try may find the store back; a destination another live run holds
    (`DestinationBusyError`): a later try finds it done or free. A refused permission, a missing
    file, a bad input or an unknown error no."""
    if isinstance(error, StorageUnavailableError | DestinationBusyError):
        return True
    return is_transient(error)


def call(what: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """Run `fn`, retrying transient failures; `what` names the file for the log and the error."""
    policy = policy or POLICY
    delays = policy.delays()
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            delay = next(delays, None)
            if delay is None:
                raise StorageUnavailableError(
                    f"{what}: storage kept failing after {policy.attempts} tries "
                    f"({type(e).__name__}: {e}); check the connection to the store and run "
                    "again (finished shards are kept)"
                ) from e
            log.warning("%s: transient storage error (%s), retrying in %.1fs", what, e, delay)
            time.sleep(delay)
