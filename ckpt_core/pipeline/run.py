"""The one run loop around a conversion's steps, for every front end: the CLI (shards on a
thread pool), the Prefect `convert` flow (shards as mapped tasks) and the VLM merge.

    with conversion_run(plan, wait_seconds=...) as needed:
        if not needed:
            ...  # the destination already holds this conversion: nothing to do
        ...      # write shards, index and assets, verify, report, publish

It holds the destination for the whole run (a second run to it waits up to `wait_seconds`
or fails naming the holder), checks again under the lock that the work is still needed,
starts (keeping a previous attempt's finished shards of the same plan), and when the body
fails keeps resumable work for a rerun or discards it (`publish.abandon`; never after the lock
was lost: the destination may be another run's by then). A refused storage operation (missing
file, permission denied) becomes its one-line `CkptError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ckpt_core.errors import CkptError
from ckpt_core.io import retry
from ckpt_core.io.lock import destination_lock, unlocked
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.conversion import ConversionPlan
from ckpt_core.pipeline.publish import abandon, check_destination, complete_interrupted, prepare

__all__ = ["conversion_run", "start"]

# Permanent storage failures, each explained in one line (`retry.explain`).
STORAGE_REFUSALS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@contextlib.contextmanager
def conversion_run(plan: ConversionPlan, *, wait_seconds: float | None = None) -> Iterator[bool]:
    """Yields True with the destination held and the work directory started, False when the
    destination already holds this conversion. `wait_seconds`: how long to wait for another
    run to the same destination (default CKPTFLOW_LOCK_WAIT_SECONDS, else 0: fail at once)."""
    if plan.already_done:
        yield False
        return
    if wait_seconds is None:
        wait_seconds = float(os.environ.get("CKPTFLOW_LOCK_WAIT_SECONDS", "0"))
    try:
        dst = Location(plan.target.dst_url)
        # The plan's owner id is the lock's fencing token: every write checks it (publish).
        with destination_lock(dst, wait_seconds, owner=plan.target.owner or None):
            # Another run may have published while this one waited for the lock.
            if not _still_needed(plan):
                yield False
                return
            prepare(plan.target, plan.resume_key)
            try:
                yield True
            except BaseException as e:
                refused = _refused_destination(e, plan.target.dst_url)
                abandon(plan.target, refused or e)
                if refused is not None:
                    raise refused from e
                raise
    except STORAGE_REFUSALS as e:
        raise retry.explain(e, plan.target.dst_url) from e
    except OSError as e:
        if (refused := _refused_destination(e, plan.target.dst_url)) is None:
            raise
        raise refused from e


def _refused_destination(error: BaseException, dst_url: str) -> CkptError | None:
    """A full disk, a read-only or forbidden destination: its one-line error, which also decides
    what `abandon` keeps (a full disk keeps the finished shards)."""
    if isinstance(error, OSError) and error.errno in retry.DESTINATION_ERRNOS:
        return retry.explain(error, dst_url)
    return None


def start(plan: ConversionPlan) -> str:
    """For driving the steps by hand, without the lock (`conversion_run` holds it): a place to
    write into, keeping a previous attempt's finished shards of the same plan; returns its URL.
    The plan's steps then check no fencing token (no lock names it)."""
    unlocked(plan.target.owner)
    return prepare(plan.target, plan.resume_key).url


def _still_needed(plan: ConversionPlan) -> bool:
    dst = Location(plan.target.dst_url)
    complete_interrupted(dst)
    return not check_destination(dst, plan.identity, plan.options.overwrite)
