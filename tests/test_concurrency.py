"""Two conversions to one destination at the same time: exactly one publishes; the other fails
with a message naming the holder, or (when asked to wait) finds the finished output. The
published files are always those of one uninterrupted run, never a mix."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from s3fs import S3FileSystem

from ckpt_core.errors import PublishError
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.convert import ConvertOptions, ConvertResult, convert
from ckpt_core.pipeline.publish import Target, finalize
from tests.helpers.cli_runs import finish, start_cli, tree
from tests.s3server import MotoServer, make_bucket

OPTIONS = ConvertOptions(dtype="fp32", max_shard_bytes=40_000)


@pytest.fixture(scope="module")
def reference(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    convert(str(tiny_hf_dir), str(out), OPTIONS)
    return out


def test_second_local_run_fails_clearly(tiny_hf_dir: Path, tmp_path: Path, reference: Path) -> None:
    dst = tmp_path / "out"
    first = start_cli(str(tiny_hf_dir), str(dst), delay="0.15")  # about 8 s of writing
    lock = tmp_path / ".out.ckptflow-lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)
    second = start_cli(str(tiny_hf_dir), str(dst))
    outcomes = [p.communicate(timeout=120) + (p.returncode,) for p in (first, second)]
    codes = sorted(code for _, _, code in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err.decode() for _, err, code in outcomes if code == 2)
    assert "another ckptflow run (pid" in loser and "is writing this destination" in loser
    errors = [line for line in loser.splitlines() if line.startswith("ckptflow: error:")]
    assert len(errors) == 1 and "Traceback" not in loser  # one line (beside the progress bar)
    assert tree(dst) == tree(reference)


def test_second_local_run_waits_then_finds_it_done(
    tiny_hf_dir: Path, tmp_path: Path, reference: Path
) -> None:
    dst = tmp_path / "out"
    env = {**os.environ, "CKPTFLOW_LOCK_WAIT_SECONDS": "120"}
    runs = [start_cli(str(tiny_hf_dir), str(dst), env) for _ in range(2)]
    outs = sorted(finish(p) for p in runs)
    assert sum("published" in o for o in outs) == 1
    assert sum("nothing to do" in o for o in outs) == 1
    assert tree(dst) == tree(reference)


def test_two_runs_to_one_s3_destination(
    tiny_hf_dir: Path, s3: MotoServer, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bucket("race")
    monkeypatch.setenv("CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS", "0.01")
    results: list[ConvertResult | BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        try:
            results.append(convert(str(tiny_hf_dir), "s3://race/out", OPTIONS, wait_seconds=0))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    published = [r for r in results if isinstance(r, ConvertResult)]
    refused = [r for r in results if isinstance(r, PublishError)]
    assert len(published) == 1 and len(refused) == 1, results
    assert "is writing this destination" in str(refused[0])
    fs = S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    for name, digest in tree(reference).items():
        assert hashlib.sha256(fs.cat(f"race/out/{name}")).hexdigest() == digest, name
    assert len(fs.find("race/out")) == len(tree(reference))


def test_marker_written_by_someone_else_stops_the_publish(tmp_path: Path) -> None:
    """The last guard if two runs ever both write (a stale lock broken twice at once)."""
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe_file("/raced/model.safetensors", b"x")
    mem.pipe_file("/raced/_SUCCESS", b"")
    target = Target("memory://raced", "memory://raced")
    with pytest.raises(PublishError, match="another run published"):
        finalize(target)
    assert Location("memory://raced").exists("_SUCCESS")


def test_object_store_lock_of_another_host_blocks_until_stale() -> None:
    """A holder on another machine cannot be probed: its heartbeat decides."""
    import json

    from ckpt_core.io.lock import destination_lock

    dst = Location("memory://locks/out")
    parent = Location("memory://locks")
    holder = {"owner": "x", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}
    parent.put_bytes(".out.ckptflow-lock", json.dumps(holder).encode())
    with (
        pytest.raises(PublishError, match=r"pid 1 on elsewhere, last heartbeat \d+s ago"),
        destination_lock(dst, wait_seconds=0.3, stale_seconds=60),
    ):
        pass
    holder["heartbeat"] = time.time() - 120  # stopped beating two minutes ago
    parent.put_bytes(".out.ckptflow-lock", json.dumps(holder).encode())
    with destination_lock(dst, stale_seconds=60):
        mine = json.loads(parent.read_bytes(".out.ckptflow-lock"))
        assert mine["owner"] != "x" and mine["pid"] == os.getpid()
    assert not parent.exists(".out.ckptflow-lock")
