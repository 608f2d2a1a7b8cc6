"""The scheduled `watch` flow: convert every checkpoint under `root` that has no published
conversion under `out_root`, one `convert` subflow run each, a few at a time."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ckpt_core.dtypes import TargetDtype
from ckpt_core.pipeline.watch import Pending, find_pending
from flows.convert import convert_flow
from tasks.common import IO_RETRIES


@task(name="find-pending", cache_policy=NO_CACHE, **IO_RETRIES)
def pending_checkpoints(root: str, out_root: str) -> list[Pending]:
    return find_pending(root, out_root)


@flow(name="watch", log_prints=True)
def watch_flow(
    root: str,
    out_root: str,
    *,
    max_conversions: int = 4,
    dtype: TargetDtype = "bf16",
    max_shard_size: str = "5GB",
    base: str | None = None,
) -> dict[str, Any]:
    """Convert what is new under `root`; at most `max_conversions` per run (the next run goes on)."""
    found = pending_checkpoints(root, out_root)
    todo = found[:max_conversions]
    print(f"{len(found)} checkpoint(s) without a published conversion; converting {len(todo)}")
    results: dict[str, Any] = {}
    failed: list[str] = []
    for item in todo:
        try:
            results[item.src] = convert_flow(
                item.src, item.dst, dtype=dtype, max_shard_size=max_shard_size, base=base
            )
        except Exception as e:  # one bad checkpoint must not stop the others
            print(f"failed: {item.src}: {e}")
            failed.append(item.src)
    if failed:
        raise RuntimeError(f"{len(failed)} conversion(s) failed: {', '.join(failed)}")
    return {"converted": sorted(results), "left_for_next_run": len(found) - len(todo)}
