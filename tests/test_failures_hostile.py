"""Failures of the destination itself: a crash inside the object-store publish sequence, a full
disk, a read-only destination, a failed --overwrite. Each ends in one line (or a resumable
state a rerun completes), never a traceback, never a half output that looks complete."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_core.formats.registry import open_reader
from ckpt_core.io import retry
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.convert import ConvertOptions, convert
from ckpt_core.pipeline.publish import INCOMPLETE
from tests.s3server import MotoServer, make_bucket
from tests.test_s3 import assert_published_as_manifest_says, fs

OPTIONS = ConvertOptions(dtype="fp32", max_shard_bytes=60_000)


@pytest.fixture(autouse=True)
def quick_retries() -> Iterator[None]:
    old = retry.set_policy(retry.RetryPolicy(attempts=3, base_seconds=0.01, cap_seconds=0.05))
    yield
    retry.set_policy(old)


@pytest.fixture
def bucket(s3: MotoServer) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    make_bucket(name)
    return name


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
