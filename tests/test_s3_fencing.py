"""A run that loses its destination lock stops writing at once and never cleans up what the run
that took the lock over published (issue 11, 6a). Run A holds the lock and has written a shard;
its heartbeat is judged stale (CKPTFLOW_LOCK_STALE_SECONDS for run B, A's heartbeat does not
beat in between), B takes the lock over and publishes a different conversion; then A goes on:
each of its next steps ends in one `LockLostError` line, and B's output stays exactly what its
manifest says. On the loopback moto server, and for a local destination whose lock file was
removed under A."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_core.errors import LockLostError, PublishError
from ckpt_core.io import lock as lockmod
from ckpt_core.io import retry
from ckpt_core.io.lock import check_held, destination_lock
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.convert import (
    ConvertOptions,
    convert,
    copy_assets,
    plan_conversion,
    write_index,
    write_shard,
)
from ckpt_core.pipeline.publish import discard, finalize
from ckpt_core.pipeline.run import conversion_run
from tests.s3server import assert_published_as_manifest_says, fs

A_OPTIONS = ConvertOptions(dtype="fp32", max_shard_bytes=60_000)
B_OPTIONS = ConvertOptions(dtype="bf16", max_shard_bytes=60_000)  # other files than A's


@pytest.fixture(autouse=True)
def quick_retries() -> Iterator[None]:
    old = retry.set_policy(retry.RetryPolicy(attempts=3, base_seconds=0.05, cap_seconds=0.2))
    yield
    retry.set_policy(old)


def _a_goes_on_after_b_published(src: str, dst: str, take_over: object) -> str:
    """Run A by hand up to its first shard; `take_over()` lets B in and publish; then every next
    step of A must refuse. Returns the line A stopped with."""
    plan = plan_conversion(src, dst, A_OPTIONS)
    assert len(plan.shards) >= 3
    with pytest.raises(LockLostError) as stopped, conversion_run(plan) as needed:
        assert needed
        first = write_shard(plan, 0)
        take_over()  # type: ignore[operator]
        for step in (
            lambda: write_shard(plan, 1),
            lambda: write_index(plan),
            lambda: copy_assets(plan),
            lambda: finalize(plan.target, [first]),
            lambda: discard(plan.target),
        ):
            with pytest.raises(LockLostError):
                step()
        write_shard(plan, 2)  # leaves the run the way a worker's failure does
    line = str(stopped.value)
    assert "\n" not in line and "no longer holds the destination's lock" in line
    assert "removed nothing" in line
    return line


def test_s3_run_that_lost_its_lock_leaves_the_new_owners_output_intact(
    tiny_hf_dir: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst, prefix = f"s3://{bucket}/out", f"{bucket}/out"

    def b_takes_over() -> None:
        time.sleep(0.6)  # A's heartbeat (every 150 s) has not beaten since it took the lock
        monkeypatch.setenv("CKPTFLOW_LOCK_STALE_SECONDS", "0.5")
        result = convert(str(tiny_hf_dir), dst, B_OPTIONS)
        assert result.report is not None and result.report.ok

    _a_goes_on_after_b_published(str(tiny_hf_dir), dst, b_takes_over)
    manifest = assert_published_as_manifest_says(prefix)
    assert manifest["options"]["dtype"] == "bf16"  # B's output, file by file
    assert not fs().exists(f"{bucket}/.out.ckptflow-lock")  # B released it; A removed nothing
    assert not fs().exists(f"{prefix}/.ckptflow-incomplete")


def test_local_run_that_lost_its_lock_leaves_the_new_owners_output_intact(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "out"

    def b_takes_over() -> None:
        # A local lock cannot go stale (the kernel holds it), but its file can be removed
        # under the holder (a cleanup script): B then locks a new file and publishes.
        os.remove(tmp_path / ".out.ckptflow-lock")
        convert(str(tiny_hf_dir), str(dst), B_OPTIONS)

    _a_goes_on_after_b_published(str(tiny_hf_dir), str(dst), b_takes_over)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["options"]["dtype"] == "bf16"
    names = {p.name for p in dst.iterdir()}
    assert names == {*manifest["files"], "manifest.json", "_SUCCESS"}
    for name, entry in manifest["files"].items():
        data = (dst / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no lock left


def test_two_runs_taking_over_one_stale_lock_at_once_only_one_holds_it(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B and C find the same stale lock. C takes it over while B is still deciding; B's
    takeover is conditional on the ETag it read (If-Match), so it fails and B, finding C's fresh
    lock, is refused: one holder, never two (a delete-then-create takeover gave two)."""
    dst = Location(f"s3://{bucket}/out")
    lock = f"{bucket}/.out.ckptflow-lock"
    dead = {"owner": "dead", "host": "elsewhere", "pid": 1, "heartbeat": 0}
    fs().pipe_file(lock, json.dumps(dead).encode())
    judged = lockmod._is_stale
    taken: list[str] = []
    with contextlib.ExitStack() as c_holds:

        def c_takes_it_first(owner: dict[str, Any] | None, stale_seconds: float) -> bool:
            verdict = judged(owner, stale_seconds)
            if verdict and not taken:  # B's look: C gets in first
                taken.append("run-c")
                c_holds.enter_context(destination_lock(dst, owner="run-c"))
            return verdict

        monkeypatch.setattr(lockmod, "_is_stale", c_takes_it_first)
        with (
            pytest.raises(PublishError, match="is writing this destination"),
            destination_lock(dst, owner="run-b"),
        ):
            pass
        check_held(dst, "run-c")
        assert json.loads(fs().cat(lock))["owner"] == "run-c"
    assert not fs().exists(lock)
