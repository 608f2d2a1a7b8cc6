"""The scheduled `watch` flow: convert the checkpoints under `root` that have no published
conversion under `out_root`, newest first, one `convert` subflow run each, a few per run.

It never stalls: a checkpoint whose conversion failed for good is recorded beside the outputs
(`{out_root}/.ckptflow-failed/{name}.json`) and skipped, and reported, on later runs until its
files change or `retry_failed` clears the records; checkpoints still being written wait; a
root that is missing or unreadable fails the run instead of finding "0 checkpoints"."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from ckpt_core.dtypes import TargetDtype
from ckpt_core.errors import CkptError
from ckpt_core.io.retry import worth_another_run
from ckpt_core.pipeline.watch import (
    Failure,
    Pending,
    Scan,
    clear_failures,
    failures,
    forget_failure,
    record_failure,
    scan,
)
from flows.convert import convert_flow
from tasks.common import IO_RETRIES, with_controls
from tasks.runs import artifact_key, flag_names, reported, run_logs, short


@task(name="find-pending", cache_policy=NO_CACHE, **IO_RETRIES)
def find_checkpoints(root: str, out_root: str, quiet_seconds: float) -> Scan:
    return scan(root, out_root, quiet_seconds=quiet_seconds)


def run_name() -> str:
    given = flow_run.parameters
    return f"watch: {short(str(given['root']))} -> {short(str(given['out_root']))}"


FLAGS = flag_names(["root", "out_root", "dtype", "max_shard_size", "base"])


@flow(name="watch", flow_run_name=run_name, log_prints=True)
def watch_flow(
    root: str,
    out_root: str,
    *,
    max_conversions: int = 4,
    dtype: TargetDtype = "bf16",
    max_shard_size: str = "5GB",
    base: str | None = None,
    quiet_minutes: float = 10,
    retry_failed: bool = False,
    conversion_timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """Convert what is new under `root`, newest first; the next run goes on where this one
    stopped. A failed checkpoint is recorded and skipped until it changes.

    Args:
        root: The directory (or URL prefix) whose subdirectories are checkpoints.
        out_root: Where each conversion is published, as out_root/<checkpoint name>.
        max_conversions: At most this many conversions per run (newest first).
        dtype: Output dtype of every conversion.
        max_shard_size: Largest output shard, e.g. 5GB.
        base: A HF model directory to check names and shapes against (recommended).
        quiet_minutes: A checkpoint whose files changed more recently is still being
            written: it waits for a later run.
        retry_failed: Clear the recorded failures first: every failed checkpoint is tried again.
        conversion_timeout_seconds: Time limit of each conversion (its convert flow run);
            empty: none (each task still has CKPTFLOW_TASK_TIMEOUT_SECONDS).
    """
    with run_logs():
        with reported(FLAGS, root=root, out_root=out_root):
            if retry_failed:
                print(f"cleared failure records: {clear_failures(out_root) or 'none'}")
            found = with_controls(find_checkpoints)(root, out_root, quiet_minutes * 60)
        todo = found.pending[:max_conversions]
        print(
            f"{len(found.pending)} checkpoint(s) without a published conversion; converting "
            f"{len(todo)}, newest first"
        )
        for src, why in found.busy:
            print(f"waiting: {src}: {why}")
        for failure in found.failed:
            print(
                f"skipped (failed {failure.failed_at}, unchanged since): {failure.src}: {failure.error}"
            )
        convert = convert_flow.with_options(timeout_seconds=conversion_timeout_seconds)
        recorded = failures(out_root)
        converted: list[str] = []
        failed: dict[str, str] = {}
        for item in todo:
            try:
                convert(item.src, item.dst, dtype=dtype, max_shard_size=max_shard_size, base=base)
            except Exception as e:  # one bad checkpoint must not stop the others
                failed[item.src] = _note_failure(out_root, item, e)
                continue
            converted.append(item.src)
            if item.name in recorded:
                forget_failure(out_root, item.name)
        _report(root, out_root, found, converted, failed, len(todo))
        if failed:
            listed = "; ".join(f"{src}: {why}" for src, why in failed.items())
            raise CkptError(f"{len(failed)} conversion(s) failed: {listed}")
        return {
            "converted": converted,
            "left_for_next_run": len(found.pending) - len(todo),
            "waiting": [src for src, _ in found.busy],
            "skipped_failed": [f.src for f in found.failed],
        }


def _note_failure(out_root: str, item: Pending, error: BaseException) -> str:
    """Record a permanent failure (skipped until the checkpoint changes); a transient one
    (storage that outlasted the retries) is left for the next run to try again."""
    message = f"{type(error).__name__}: {error}"
    if worth_another_run(error):
        print(f"failed (transient, the next run tries again): {item.src}: {message}")
        return message
    record_failure(out_root, item, message)
    print(f"failed (recorded; skipped until it changes): {item.src}: {message}")
    return message


def _report(
    root: str,
    out_root: str,
    found: Scan,
    converted: list[str],
    failed: dict[str, str],
    tried: int,
) -> None:
    """What this run did and skipped, on its Artifacts tab (one key per out_root)."""
    lines = [f"## ckptflow watch\n\n`{root}` -> `{out_root}`\n"]
    rows: list[tuple[str, str, str]] = [(src, "converted", "") for src in converted]
    rows += [(src, "failed", why) for src, why in failed.items()]
    rows += [(src, "waiting (still being written)", why) for src, why in found.busy]
    rows += [(f.src, "skipped (failed before, unchanged)", _cell(f)) for f in found.failed]
    rows += [(p.src, "left for the next run", "") for p in found.pending[tried:]]
    lines.append("| checkpoint | outcome | detail |\n| --- | --- | --- |")
    lines += [f"| `{src}` | {what} | {detail.replace('|', '/')} |" for src, what, detail in rows]
    create_markdown_artifact(
        key=artifact_key("watch-report", out_root),
        markdown="\n".join(lines) + "\n",
        description=f"{len(converted)} converted, {len(failed)} failed, "
        f"{len(found.failed)} skipped after an earlier failure, {len(found.busy)} waiting",
    )


def _cell(failure: Failure) -> str:
    return f"{failure.failed_at}: {failure.error}"
