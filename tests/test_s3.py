"""Object-store conversions against a real S3-compatible server on loopback (moto, server mode):
the same manifest as a local conversion, ranged reads, create-only marker, resume, a server
restart mid-upload, a slow network, and clear permanent errors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3fs import S3FileSystem

from ckpt_core.errors import CkptError, FormatError, StorageUnavailableError
from ckpt_core.formats.registry import open_reader
from ckpt_core.io import retry
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import convert as core
from ckpt_core.pipeline.convert import ConvertOptions, convert
from ckpt_core.pipeline.publish import DONE_DIR, INCOMPLETE
from tests.s3server import (
    MotoServer,
    SlowProxy,
    assert_published_as_manifest_says,
    fs,
    make_bucket,
    use_endpoint,
)

OPTIONS = ConvertOptions(dtype="fp32", max_shard_bytes=60_000)


@pytest.fixture(autouse=True)
def quick_retries() -> Iterator[None]:
    old = retry.set_policy(retry.RetryPolicy(attempts=8, base_seconds=0.05, cap_seconds=0.5))
    yield
    retry.set_policy(old)


@pytest.fixture(scope="module")
def local_manifest(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("local") / "out"
    convert(str(tiny_hf_dir), str(out), OPTIONS)
    return (out / "manifest.json").read_bytes()


def test_s3_manifest_identical_to_local(
    tiny_hf_dir: Path, bucket: str, local_manifest: bytes
) -> None:
    dst = f"s3://{bucket}/models/out"
    result = convert(str(tiny_hf_dir), dst, OPTIONS)
    assert result.report is not None and result.report.ok
    assert fs().cat(f"{bucket}/models/out/manifest.json") == local_manifest
    manifest = assert_published_as_manifest_says(f"{bucket}/models/out")
    assert len([n for n in manifest["files"] if n.startswith("model-")]) >= 3
    assert not fs().exists(f"{bucket}/models/.out.ckptflow-lock")  # released
    # ckptflow reads its own S3 output back, and a rerun is a no-op.
    reader = open_reader(dst)
    assert len(reader.index()) == json.loads(local_manifest)["report"]["tensors"]
    assert "nothing to do" in convert(str(tiny_hf_dir), dst, OPTIONS).message


def test_reading_from_s3_uses_byte_ranges(
    tiny_hf_dir: Path, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = fs()
    for p in tiny_hf_dir.iterdir():
        s3.pipe_file(f"{bucket}/src/{p.name}", p.read_bytes())
    calls: list[tuple[str, int | None, int | None]] = []
    real = S3FileSystem.cat_file

    def recording(
        self: S3FileSystem, path: str, start: Any = None, end: Any = None, **kw: Any
    ) -> Any:
        calls.append((path, start, end))
        return real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(S3FileSystem, "cat_file", recording)
    monkeypatch.setattr("ckpt_core.io.storage.REMOTE_CHUNK_BYTES", 64 * 1024)
    out = tmp_path / "out"
    convert(f"s3://{bucket}/src", str(out), OPTIONS)
    weights = [c for c in calls if c[0].endswith("model.safetensors")]
    size = (tiny_hf_dir / "model.safetensors").stat().st_size
    assert weights and all(s is not None and e is not None for _, s, e in weights)
    assert max(e - s for _, s, e in weights) <= 64 * 1024 < size  # type: ignore[operator]
    # Same tensors, same bytes as converting the local copy.
    local = tmp_path / "local"
    convert(str(tiny_hf_dir), str(local), OPTIONS)
    for p in local.iterdir():
        if p.name != "manifest.json":
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_marker_is_create_only_and_required(tiny_hf_dir: Path, bucket: str) -> None:
    dst = f"s3://{bucket}/out"
    convert(str(tiny_hf_dir), dst, OPTIONS)
    with pytest.raises(FileExistsError):
        Location(dst).put_bytes("_SUCCESS", b"", create_only=True)  # moto honours If-None-Match
    fs().rm(f"{bucket}/out/_SUCCESS")
    with pytest.raises(FormatError, match="no _SUCCESS marker"):
        open_reader(dst)


def test_interrupted_s3_conversion_resumes_without_rewriting(
    tiny_hf_dir: Path, bucket: str, local_manifest: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst, prefix = f"s3://{bucket}/out", f"{bucket}/out"
    real = core.write_safetensors
    written: list[str] = []

    def dies_after_three(root: Location, filename: str, *args: Any) -> Any:
        if len(written) == 3:
            raise ConnectionAbortedError("simulated crash of the machine")
        written.append(filename)
        return real(root, filename, *args)

    monkeypatch.setattr(core, "write_safetensors", dies_after_three)
    monkeypatch.setattr(retry, "is_transient", lambda e: False)  # the "crash" is not retried
    with pytest.raises(ConnectionAbortedError):
        convert(
            str(tiny_hf_dir), dst, ConvertOptions(dtype="fp32", max_shard_bytes=60_000), workers=1
        )
    s3 = fs()
    assert not s3.exists(f"{prefix}/_SUCCESS") and s3.exists(f"{prefix}/{INCOMPLETE}")
    with pytest.raises(FormatError, match="no _SUCCESS"):
        open_reader(dst)
    stamps = {n: s3.info(f"{prefix}/{n}")["ETag"] for n in written}
    assert len(s3.ls(f"{prefix}/{DONE_DIR}")) == 3
    modified = {n: s3.info(f"{prefix}/{n}")["LastModified"] for n in written}
    # LastModified has one-second resolution; a tag marks the objects now instead: any upload
    # (PUT or multipart) of an object, even of the same bytes, replaces it without its tags.
    for n in written:
        s3.put_tags(f"{prefix}/{n}", {"first-run": n})

    monkeypatch.setattr(core, "write_safetensors", real)
    again: list[str] = []

    def counting(root: Location, filename: str, *args: Any) -> Any:
        again.append(filename)
        return real(root, filename, *args)

    monkeypatch.setattr(core, "write_safetensors", counting)
    convert(str(tiny_hf_dir), dst, OPTIONS)
    assert not set(again) & set(written)
    assert {n: s3.info(f"{prefix}/{n}")["LastModified"] for n in written} == modified
    assert {n: s3.info(f"{prefix}/{n}")["ETag"] for n in written} == stamps
    assert {n: s3.get_tags(f"{prefix}/{n}") for n in written} == {
        n: {"first-run": n} for n in written
    }, "a finished object was uploaded again"
    assert s3.cat(f"{prefix}/manifest.json") == local_manifest
    assert_published_as_manifest_says(prefix)


def test_server_restart_mid_upload_fails_clearly_or_resumes(
    tiny_hf_dir: Path,
    local_manifest: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """moto forgets everything on restart: the run must either finish with a complete, correct
    output (retries carried it over) or fail with a clear error publishing nothing; a rerun
    then finishes it. Never a marker over missing or wrong files."""
    server = MotoServer(log=tmp_path / "moto.log")
    server.start()
    try:
        use_endpoint(monkeypatch, server.endpoint)
        make_bucket("restart")
        monkeypatch.setenv("CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS", "0.03")
        dst, prefix = "s3://restart/out", "restart/out"

        def restart_when_shards_appear() -> None:
            s3 = fs()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if len([p for p in s3.ls(prefix) if "model-" in p]) >= 2:
                        break
                except FileNotFoundError:
                    pass
                time.sleep(0.02)
            server.restart(down_seconds=0.3)
            make_bucket("restart")  # the store comes back empty

        chaos = threading.Thread(target=restart_when_shards_appear)
        chaos.start()
        try:
            convert(str(tiny_hf_dir), dst, OPTIONS, workers=1)
            outcome = "finished"
        except CkptError as e:
            outcome = f"failed: {e}"
            assert "\n" not in str(e)
        chaos.join()
        print(f"server restart mid-upload: {outcome}")
        s3 = fs()
        if outcome == "finished":
            assert_published_as_manifest_says(prefix)
        else:
            assert not s3.exists(f"{prefix}/_SUCCESS"), outcome
            monkeypatch.delenv("CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS")
            convert(str(tiny_hf_dir), dst, OPTIONS)
        assert s3.cat(f"{prefix}/manifest.json") == local_manifest
        assert_published_as_manifest_says(prefix)
    finally:
        server.kill()


def test_slow_network(
    tiny_hf_dir: Path,
    moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    local_manifest: bytes,
) -> None:
    proxy = SlowProxy(moto_server.port, bytes_per_second=2e6, latency_seconds=0.005)
    try:
        use_endpoint(monkeypatch, proxy.endpoint)
        make_bucket("slow")
        started = time.monotonic()
        convert(str(tiny_hf_dir), "s3://slow/out", OPTIONS)
        elapsed = time.monotonic() - started
        assert proxy.bytes > 2 * (tiny_hf_dir / "model.safetensors").stat().st_size
        assert elapsed > proxy.bytes / 2e6 * 0.5  # the throttle really applied
        assert fs().cat("slow/out/manifest.json") == local_manifest
        assert_published_as_manifest_says("slow/out")
    finally:
        proxy.close()


def test_missing_bucket_is_a_clear_permanent_error(tiny_hf_dir: Path, s3: MotoServer) -> None:
    started = time.monotonic()
    with pytest.raises(CkptError, match="no-such-bucket.*does not exist"):
        convert(str(tiny_hf_dir), "s3://no-such-bucket/out", OPTIONS)
    assert time.monotonic() - started < 10  # not retried


def test_missing_source_object_is_not_retried(s3: MotoServer, bucket: str) -> None:
    calls = 0

    def missing() -> bytes:
        nonlocal calls
        calls += 1
        return bytes(fs().cat_file(f"{bucket}/nope"))

    with pytest.raises(FileNotFoundError):
        retry.call("nope", missing)
    assert calls == 1


def test_transient_errors_are_retried_then_reported() -> None:
    import errno

    from botocore.exceptions import EndpointConnectionError

    transient = [
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        OSError(errno.EBUSY, "SlowDown: Please reduce your request rate."),
        OSError(errno.EIO, "We encountered an internal error"),
        TimeoutError("read timed out"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    ]
    for error in transient:
        assert retry.is_transient(error), error
    for error in (FileNotFoundError("x"), PermissionError("x"), FormatError("bad header")):
        assert not retry.is_transient(error), error
    attempts = 0

    def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return "ok"

    assert retry.call("f", flaky) == "ok" and attempts == 3

    def always() -> None:
        raise OSError(errno.EBUSY, "SlowDown")

    with pytest.raises(StorageUnavailableError, match="kept failing after 8 tries"):
        retry.call("s3://b/x", always)


def test_cli_s3_endpoint_flag_instead_of_the_variable(
    tiny_hf_dir: Path,
    s3: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ckptflow.cli import main

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    dst = f"s3://{bucket}/flag"
    try:
        assert main(["convert", str(tiny_hf_dir), dst, "--s3-endpoint", s3.endpoint]) == 0
    finally:
        from ckpt_core.io.storage import configure

        configure("s3")  # back to the environment for the other tests
    out = capsys.readouterr().out
    assert "published" in out and s3.endpoint not in out
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert fs().exists(f"{bucket}/flag/_SUCCESS")


def test_cache_dir_stages_once_and_gives_the_same_manifest(
    tiny_hf_dir: Path, s3: MotoServer, bucket: str, tmp_path: Path
) -> None:
    s3fs_ = fs()
    s3fs_.put(str(tiny_hf_dir), f"{bucket}/src", recursive=True)
    src = f"s3://{bucket}/src"
    direct = convert(src, str(tmp_path / "direct"), OPTIONS)
    assert direct.report is not None
    cache = tmp_path / "cache"
    staged_opts = ConvertOptions(dtype="fp32", max_shard_bytes=60_000, cache_dir=str(cache))
    convert(src, str(tmp_path / "staged"), staged_opts)
    copies = [p for p in cache.iterdir() if p.is_dir()]
    assert len(copies) == 1 and (copies[0] / "model.safetensors").is_file()
    # The manifest names the remote source and its fingerprint, not the cached copy.
    staged_manifest = json.loads((tmp_path / "staged" / "manifest.json").read_text())
    assert staged_manifest["source"]["url"] == src
    assert str(cache) not in (tmp_path / "staged" / "manifest.json").read_text()
    stamp = (copies[0] / "model.safetensors").stat().st_mtime_ns
    again = convert(src, str(tmp_path / "staged"), staged_opts)
    assert "nothing to do" in again.message
    assert (copies[0] / "model.safetensors").stat().st_mtime_ns == stamp  # not downloaded again
    for name in json.loads((tmp_path / "direct" / "manifest.json").read_text())["files"]:
        assert (tmp_path / "staged" / name).read_bytes() == (
            tmp_path / "direct" / name
        ).read_bytes()
