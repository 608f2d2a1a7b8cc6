"""`--overwrite` to an object store never destroys the previous output before the new one is
complete (issue 11, 6b): the new output is staged under `.NAME.ckptflow-staging/` beside the
destination and swapped in only once verified. On the loopback moto server: v1 published
(fp32, small shards); an overwrite (bf16, other shard names) fails halfway, for a bad input and
for an interrupted run; v1 stays complete, readable and as its manifest says; a crash in the
middle of the swap is completed by a rerun without rewriting shards; a successful overwrite
leaves v2 only (no v1 file, no staging prefix, no lock)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3fs import S3FileSystem

from ckpt_core.errors import FormatError
from ckpt_core.formats.registry import open_reader
from ckpt_core.io import retry
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import convert as core
from ckpt_core.pipeline.convert import ConvertOptions, convert
from ckpt_core.pipeline.publish import INCOMPLETE
from tests.s3server import assert_published_as_manifest_says, fs

V1 = ConvertOptions(dtype="fp32", max_shard_bytes=60_000)
V2 = ConvertOptions(dtype="bf16", max_shard_bytes=100_000, overwrite=True)


@pytest.fixture(autouse=True)
def quick_retries() -> Iterator[None]:
    old = retry.set_policy(retry.RetryPolicy(attempts=3, base_seconds=0.05, cap_seconds=0.2))
    yield
    retry.set_policy(old)


@pytest.fixture
def v1(tiny_hf_dir: Path, bucket: str) -> tuple[str, dict[str, Any]]:
    dst = f"s3://{bucket}/models/out"
    convert(str(tiny_hf_dir), dst, V1)
    return dst, assert_published_as_manifest_says(f"{bucket}/models/out")


REAL_WRITE, REAL_TRANSIENT = core.write_safetensors, retry.is_transient


def _restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Back to the real steps (not `undo`: that would drop the s3 fixture's endpoint too)."""
    monkeypatch.setattr(core, "write_safetensors", REAL_WRITE)
    monkeypatch.setattr(retry, "is_transient", REAL_TRANSIENT)


def _fails_after_first_shard(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    real = REAL_WRITE
    calls: list[str] = []

    def second_shard_fails(root: Location, filename: str, *args: Any) -> Any:
        if calls:
            raise error
        calls.append(filename)
        return real(root, filename, *args)

    monkeypatch.setattr(core, "write_safetensors", second_shard_fails)
    monkeypatch.setattr(retry, "is_transient", lambda e: False)


def _v1_intact(dst: str, manifest: dict[str, Any]) -> None:
    prefix = dst.removeprefix("s3://")
    assert assert_published_as_manifest_says(prefix) == manifest
    assert len(open_reader(dst).index()) == manifest["report"]["tensors"]  # still readable


def _only_v2(dst: str, v1_manifest: dict[str, Any]) -> None:
    prefix = dst.removeprefix("s3://")
    v2 = assert_published_as_manifest_says(prefix)  # exactly v2's files: no v1 leftover
    assert v2["options"]["dtype"] == "bf16"
    assert set(v2["files"]) != set(v1_manifest["files"])
    parent = prefix.rsplit("/", 1)[0]
    assert fs().ls(parent) == [prefix]  # no staging prefix, no lock object


@pytest.mark.parametrize(
    "error",
    [
        FormatError("model.safetensors: tensor 5 cannot be read (simulated bad input)"),
        ConnectionAbortedError("simulated crash of the machine"),
    ],
    ids=["bad-input", "interrupted"],
)
def test_failed_overwrite_keeps_the_previous_output(
    tiny_hf_dir: Path,
    v1: tuple[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
) -> None:
    dst, manifest = v1
    _fails_after_first_shard(monkeypatch, error)
    with pytest.raises(type(error)):
        convert(str(tiny_hf_dir), dst, V2, workers=1)
    _v1_intact(dst, manifest)
    _restore(monkeypatch)
    convert(str(tiny_hf_dir), dst, V2)
    _only_v2(dst, manifest)


def test_crash_in_the_middle_of_the_swap_is_completed_by_a_rerun(
    tiny_hf_dir: Path, v1: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    dst, manifest = v1
    prefix = dst.removeprefix("s3://")
    real_copy = S3FileSystem._cp_file
    copies: list[str] = []

    async def dies_at_third_copy(self: S3FileSystem, path1: str, path2: str, **kw: Any) -> Any:
        if len(copies) == 2:
            raise ConnectionAbortedError("simulated crash during the swap")
        copies.append(path2)
        return await real_copy(self, path1, path2, **kw)

    monkeypatch.setattr(S3FileSystem, "_cp_file", dies_at_third_copy)
    S3FileSystem.clear_instance_cache()  # instances bind their sync methods when made
    monkeypatch.setattr(retry, "is_transient", lambda e: False)
    with pytest.raises(ConnectionAbortedError):
        convert(str(tiny_hf_dir), dst, V2)
    s3 = fs()
    assert not s3.exists(f"{prefix}/_SUCCESS") and s3.exists(f"{prefix}/{INCOMPLETE}")
    with pytest.raises(FormatError, match="no _SUCCESS"):
        open_reader(dst)  # half v1, half v2: never read as complete
    monkeypatch.setattr(S3FileSystem, "_cp_file", real_copy)
    S3FileSystem.clear_instance_cache()
    _restore(monkeypatch)
    written: list[str] = []
    real_write = REAL_WRITE

    def counting(root: Location, filename: str, *args: Any) -> Any:
        written.append(filename)
        return real_write(root, filename, *args)

    monkeypatch.setattr(core, "write_safetensors", counting)
    convert(str(tiny_hf_dir), dst, V2)
    assert written == []  # the staged, finished shards were kept, only the swap was redone
    _only_v2(dst, manifest)
