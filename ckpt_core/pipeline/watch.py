"""Finding checkpoints under a root that have no published conversion yet (for the scheduled
`watch` flow), newest first, and the failure records that keep a broken one from being tried
again on every run. Planning only: no conversion happens here.

A checkpoint is left for a later run while it may still be written: any of its files changed
within `quiet_seconds`, or it lacks its framework's completion marker (DeepSpeed writes
`latest` after the tag directory). A conversion that failed for good is recorded in
`{out_root}/.ckptflow-failed/{name}.json` (the error, the source's fingerprint); the checkpoint
is skipped, and reported, until its files change or the record is cleared.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from ckpt_core.errors import CkptError, FormatError, StorageRefusedError
from ckpt_core.formats.registry import detect
from ckpt_core.io import retry
from ckpt_core.io.fingerprint import fingerprint
from ckpt_core.io.storage import Location, join_url

__all__ = [
    "FAILED_DIR",
    "Failure",
    "Pending",
    "Scan",
    "clear_failures",
    "failures",
    "find_pending",
    "forget_failure",
    "record_failure",
    "scan",
]

FAILED_DIR = ".ckptflow-failed"
_ERROR_CHARS = 2000  # a record holds the one-line message, not a whole traceback


@dataclass(frozen=True)
class Pending:
    src: str
    dst: str
    format: str
    fingerprint: str = ""  # of its files (names, sizes, change stamps), from one listing
    changed_at: float = 0.0  # its newest file's change time (seconds since the epoch)

    @property
    def name(self) -> str:
        return posixpath.basename(self.src.rstrip("/"))


@dataclass(frozen=True)
class Failure:
    name: str
    src: str
    error: str
    fingerprint: str
    failed_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class Scan:
    pending: list[Pending] = field(default_factory=list)  # newest first
    failed: list[Failure] = field(default_factory=list)  # recorded failures, unchanged since
    busy: list[tuple[str, str]] = field(default_factory=list)  # (src, why it waits)


def _changed_seconds(info: dict[str, Any]) -> float:
    """A listing entry's change time: local `mtime`, S3 `LastModified`, else `created`."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return 0.0


def _listing(src: str) -> dict[str, dict[str, Any]]:
    where = Location(src)
    found = retry.call(src, lambda: where.fs.find(where.path, detail=True))
    return {posixpath.relpath(path, where.path): dict(info) for path, info in found.items()}


def _unfinished(fmt: str, names: list[str]) -> str | None:
    """Why a checkpoint lacks its framework's completion marker, or None."""
    tags = [n for n in names if n.startswith("global_step")]
    if fmt == "deepspeed" and tags and "latest" not in names:
        return "no `latest` file yet (DeepSpeed writes it once the tag directory is complete)"
    return None


def _root_names(root_url: str) -> list[str]:
    """The names under the watched root; a root that is missing or not a directory fails (a
    schedule pointed at the wrong place must not look green)."""
    root = Location(root_url)
    if not root.isdir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise StorageRefusedError(
            f"{root_url}: the watched root {what}; set --root to the directory that holds the "
            "checkpoints"
        )
    try:
        return root.listdir()
    except (PermissionError, FileNotFoundError, NotADirectoryError) as e:
        raise retry.explain(e, root_url) from e


def scan(
    root_url: str, out_root_url: str, *, quiet_seconds: float = 0.0, now: float | None = None
) -> Scan:
    """Each directory directly under `root_url` that holds a readable checkpoint and whose
    destination `out_root_url/<name>` has no `_SUCCESS`: pending (newest first), waiting (still
    being written) or skipped (its recorded failure still holds)."""
    from ckpt_core.pipeline.manifest import SUCCESS

    now = time.time() if now is None else now
    recorded = failures(out_root_url)
    result = Scan()
    for name in _root_names(root_url):
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
        if Location(dst).exists(SUCCESS):
            continue
        listing = _listing(src)
        item = Pending(
            src,
            dst,
            fmt.name,
            fingerprint(listing.items()),
            max((_changed_seconds(i) for i in listing.values()), default=0.0),
        )
        unfinished = _unfinished(fmt.name, Location(src).listdir())
        if unfinished is None and now - item.changed_at < quiet_seconds:
            unfinished = (
                f"files changed {now - item.changed_at:.0f} s ago (waiting {quiet_seconds:.0f} s)"
            )
        if unfinished is not None:
            result.busy.append((src, unfinished))
        elif name in recorded and recorded[name].fingerprint == item.fingerprint:
            result.failed.append(recorded[name])
        else:
            result.pending.append(item)
    result.pending.sort(key=lambda p: (p.changed_at, p.src), reverse=True)
    return result


def find_pending(root_url: str, out_root_url: str) -> list[Pending]:
    """The checkpoints to convert now (see `scan`), newest first."""
    return scan(root_url, out_root_url).pending


def _record_name(name: str) -> str:
    return f"{FAILED_DIR}/{name}.json"


def record_failure(out_root_url: str, item: Pending, error: str) -> Failure:
    """Remember that converting `item` failed, so that later runs skip it until it changes."""
    failure = Failure(
        name=item.name,
        src=item.src,
        error=" ".join(error.split())[:_ERROR_CHARS],
        fingerprint=item.fingerprint,
        failed_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    data = json.dumps(asdict(failure), indent=2) + "\n"
    Location(out_root_url).put_bytes(_record_name(item.name), data.encode())
    return failure


def forget_failure(out_root_url: str, name: str) -> None:
    """Drop `name`'s failure record (after it converted, or to try it again)."""
    Location(out_root_url).remove(_record_name(name))


def failures(out_root_url: str) -> dict[str, Failure]:
    """The recorded failures under `out_root_url`, by checkpoint name."""
    where = Location(join_url(out_root_url, FAILED_DIR))
    found: dict[str, Failure] = {}
    for entry in where.listdir():
        if not entry.endswith(".json"):
            continue
        try:
            data = json.loads(where.read_text(entry))
            found[entry.removesuffix(".json")] = Failure(**data)
        except (ValueError, TypeError) as e:
            raise FormatError(
                f"{where.file(entry)}: not a ckptflow failure record ({e}); delete it"
            ) from e
    return found


def clear_failures(out_root_url: str, names: list[str] | None = None) -> list[str]:
    """Drop the failure records of `names` (all when None); returns the names cleared."""
    recorded = failures(out_root_url)
    cleared = sorted(recorded if names is None else set(names) & set(recorded))
    for name in cleared:
        forget_failure(out_root_url, name)
    return cleared
