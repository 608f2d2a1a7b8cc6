"""The one run loop (`ckpt_core.pipeline.run`) around the VLM merge, as around every conversion:
two merges to one output never interleave (the second fails at once naming the holder, or
waits), and a merge killed mid-write resumes to the bytes of an uninterrupted merge, keeping
the shards it had finished.

The `ckptflow merge` subprocesses are slowed by the test-only
CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS; the tests wait for conditions (the lock taken, N
finished shards), never for fixed times."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt_core.errors import PublishError
from ckpt_core.io.storage import PART_SUFFIX
from ckpt_core.pipeline.publish import DONE_DIR, INCOMPLETE
from ckpt_core.vlm.merge import merge
from ckpt_core.vlm.split import split
from ckpt_core.vlm.tiny_trainer import train
from ckptflow.cli import main
from tests.fixtures.tiny_vlm import save_tiny_vlm
from tests.helpers.cli_runs import REPO, finish, kill_when, tree

MAX_SHARD = 100_000  # 9 shards of the tiny VLM
DELAY_ENV = "CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base VLM, rank files of 2 ranks, and their uninterrupted merge (the reference)."""
    root = tmp_path_factory.mktemp("run-loop")
    save_tiny_vlm(root / "base")
    split(str(root / "base"), str(root / "split"))
    train(str(root / "split"), str(root / "epoch"), 2, steps=0)
    paths = {"base": root / "base", "epoch": root / "epoch", "reference": root / "reference"}
    merge(*_urls(paths, paths["reference"]), max_shard_bytes=MAX_SHARD)
    return paths


def _urls(runs: dict[str, Path], out: Path) -> tuple[str, str, str]:
    return str(runs["epoch"]), str(out), str(runs["base"])


def _merge_args(runs: dict[str, Path], out: Path) -> list[str]:
    epoch, output, base = _urls(runs, out)
    return ["merge", "--checkpoint-dir", epoch, "--output-dir", output, "--model-name", base,
            "--max-shard-size", str(MAX_SHARD), "--workers", "1"]  # fmt: skip


def start_merge(runs: dict[str, Path], out: Path, delay: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "ckptflow.cli", *_merge_args(runs, out)]
    env = {**os.environ, DELAY_ENV: delay}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.01)


def holding_lock(out: Path) -> Callable[[], bool]:
    lock = out.parent / f".{out.name}.ckptflow-lock"
    return lambda: lock.exists() and bool(lock.read_bytes())


@pytest.fixture(autouse=True)
def _no_delay_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DELAY_ENV, raising=False)  # only the subprocesses are slowed


def test_second_merge_fails_at_once_naming_the_holder(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    first = start_merge(runs, out, delay="0.1")  # ~11 s of writing and verifying
    wait_until(holding_lock(out), first, "the first merge holds the output")
    assert main(_merge_args(runs, out)) == 2
    assert first.poll() is None, "the second merge waited for the first one"
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error:"), err
    assert f"another ckptflow run (pid {first.pid} on " in lines[0]
    assert "is writing this destination" in lines[0]
    assert "published" in finish(first)
    assert tree(out) == tree(runs["reference"])


def test_second_merge_waits_then_finds_it_merged(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    first = start_merge(runs, out, delay="0.05")
    wait_until(holding_lock(out), first, "the first merge holds the output")
    with pytest.raises(PublishError, match="is writing this destination"):
        merge(*_urls(runs, out), max_shard_bytes=MAX_SHARD, wait_seconds=0)
    second = merge(*_urls(runs, out), max_shard_bytes=MAX_SHARD, wait_seconds=120)
    assert (out / "_SUCCESS").exists(), "the second merge stopped waiting before the first ended"
    assert second.skipped and second.message == "already merged"
    assert "published" in finish(first)
    assert tree(out) == tree(runs["reference"])
    capsys.readouterr()
    assert main([*_merge_args(runs, out), "--wait-for-lock", "5"]) == 0  # the CLI's flag
    assert capsys.readouterr().out.startswith("already merged")


def test_killed_merge_resumes_byte_identical_keeping_finished_shards(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    work = tmp_path / ".merged.ckptflow-staging"

    def done() -> list[str]:
        records = work / DONE_DIR
        found = records.glob("*.json") if records.is_dir() else []
        return sorted(p.name.removesuffix(".json") for p in found)

    def mid_write() -> bool:
        return (
            (work / INCOMPLETE).exists() and len(done()) >= 2 and any(work.glob(f"*{PART_SUFFIX}"))
        )

    kill_when(start_merge(runs, out, delay="0.04"), mid_write, "two shards and a third begun")
    assert not out.exists(), "the killed merge published something"
    finished = done()
    assert len(finished) >= 2
    stamps = {n: ((work / n).stat().st_ino, (work / n).stat().st_mtime_ns) for n in finished}

    result = merge(*_urls(runs, out), max_shard_bytes=MAX_SHARD)
    assert not result.skipped
    assert tree(out) == tree(runs["reference"])
    kept = {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in finished}
    assert kept == stamps, "a finished shard was rewritten on resume"
    assert not work.exists() and not (tmp_path / ".merged.ckptflow-lock").exists()
    again = merge(*_urls(runs, out), max_shard_bytes=MAX_SHARD)
    assert again.skipped and again.message == "already merged"
