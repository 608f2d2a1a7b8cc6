"""Failures of the destination itself: a crash inside the object-store publish sequence, a full
disk, a read-only destination, a failed --overwrite. Each ends in one line (or a resumable
state a rerun completes), never a traceback, never a half output that looks complete."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckpt_core.formats.registry import open_reader
from ckpt_core.io import retry
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.convert import ConvertOptions, convert
from ckpt_core.pipeline.publish import INCOMPLETE, STAGING_SUFFIX
from tests.s3server import assert_published_as_manifest_says, fs

OPTIONS = ConvertOptions(dtype="fp32", max_shard_bytes=60_000)


@pytest.fixture(autouse=True)
def quick_retries() -> Iterator[None]:
    old = retry.set_policy(retry.RetryPolicy(attempts=3, base_seconds=0.01, cap_seconds=0.05))
    yield
    retry.set_policy(old)


class Crash(BaseException):
    """A process dying at that point (not an error ckptflow would handle)."""


def test_s3_crash_between_marker_and_incomplete_removal_is_completed_by_a_rerun(
    tiny_hf_dir: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = f"s3://{bucket}/models/out"
    real_remove = Location.remove

    def dies_dropping_the_marker(self: Location, relative: str = "", **kw: bool) -> None:
        if relative == INCOMPLETE and self.exists("_SUCCESS"):
            raise Crash
        real_remove(self, relative, **kw)

    monkeypatch.setattr(Location, "remove", dies_dropping_the_marker)
    with pytest.raises(Crash):
        convert(str(tiny_hf_dir), dst, OPTIONS)
    assert fs().exists(f"{bucket}/models/out/{INCOMPLETE}")  # the crash window, reproduced
    monkeypatch.setattr(Location, "remove", real_remove)

    convert(str(tiny_hf_dir), dst, OPTIONS)
    assert not fs().exists(f"{bucket}/models/out/{INCOMPLETE}")
    assert_published_as_manifest_says(f"{bucket}/models/out")
    assert open_reader(dst).index()
    assert "nothing to do" in convert(str(tiny_hf_dir), dst, OPTIONS).message


# --- a full disk, a read-only destination (through the CLI, in a subprocess) ------------------

_CLI = """
import resource, signal, sys
from ckptflow.cli import main
limit = int(sys.argv[3])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--dtype", "fp32", "--max-shard-size", "60KB"]))
"""


def cli(src: Path, dst: Path, file_limit_bytes: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLI, str(src), str(dst), str(file_limit_bytes)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[1],
    )


def error_line(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("ckptflow: error:")]
    assert len(lines) == 1, run.stderr[-3000:]
    return lines[0]


def same_tensors(out: Path, truth: Path) -> None:
    got, want = open_reader(str(out)), open_reader(str(truth))
    assert got.index().keys() == want.index().keys()
    for name in want.index():
        assert torch.equal(got.read(name), want.read(name)), name


def test_file_size_limit_ends_in_one_line_and_keeps_finished_shards(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    """Always runs (no root needed): RLIMIT_FSIZE turns a shard write into EFBIG."""
    dst = tmp_path / "out"
    line = error_line(cli(tiny_hf_dir, dst, file_limit_bytes=30_000))
    assert str(dst) in line and "finished shards are kept" in line and "run again" in line
    assert not dst.exists()
    assert (tmp_path / f".out{STAGING_SUFFIX}").is_dir()  # resumable: kept
    rerun = cli(tiny_hf_dir, dst)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not (tmp_path / f".out{STAGING_SUFFIX}").exists()
    same_tensors(dst, tiny_hf_dir)


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "mnt"
    where.mkdir()
    yield where
    subprocess.run(["umount", str(where)], capture_output=True)


def _mount(*args: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs (the RLIMIT_FSIZE test covers the full disk)")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount refused here: {done.stderr.strip()}")


def test_full_disk_ends_in_one_line_and_a_rerun_resumes(
    tiny_hf_dir: Path, mount_point: Path
) -> None:
    _mount("-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount_point))
    dst = mount_point / "out"
    line = error_line(cli(tiny_hf_dir, dst))
    assert "no space left" in line and "finished shards are kept: free space" in line
    assert not dst.exists() and (mount_point / f".out{STAGING_SUFFIX}").is_dir()
    _mount("-o", "remount,size=4m", str(mount_point))
    assert cli(tiny_hf_dir, dst).returncode == 0
    assert sorted(os.listdir(mount_point)) == ["out"]
    same_tensors(dst, tiny_hf_dir)


def test_read_only_destination_ends_in_one_line_and_leaves_nothing(
    tiny_hf_dir: Path, tmp_path: Path, mount_point: Path
) -> None:
    if os.geteuid() == 0:  # root writes through chmod: a read-only bind mount refuses it
        _mount("--bind", "-o", "ro", str(tmp_path / "mnt"), str(mount_point))
    else:
        mount_point.chmod(0o555)
    line = error_line(cli(tiny_hf_dir, mount_point / "out"))
    assert str(mount_point) in line
    assert "read-only" in line or "permission denied" in line
    assert os.listdir(mount_point) == []
