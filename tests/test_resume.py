"""Kill and resume: `ckptflow convert` is SIGKILLed at several points, run again, and must finish
with output byte-identical to an uninterrupted run, without rewriting the shards it had finished.

The runs are slowed by the test-only CKPTFLOW_TEST_DELAY_PER_TENSOR_SECONDS so that the test can
pick its kill points by watching the work directory (a shard being written, N finished shards,
verification under way)."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3fs import S3FileSystem

from ckpt_core.io.storage import PART_SUFFIX
from ckpt_core.pipeline.convert import ConvertOptions, convert, plan_conversion
from ckpt_core.pipeline.publish import DONE_DIR, INCOMPLETE
from tests.helpers.cli_runs import MAX_SHARD, finish, kill_when, start_cli, tree
from tests.s3server import MotoServer, make_bucket, subprocess_env

OPTIONS = ConvertOptions(dtype="fp32", max_shard_bytes=MAX_SHARD)


@pytest.fixture(scope="module")
def reference(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    convert(str(tiny_hf_dir), str(out), OPTIONS)
    return out


def _stamps(work: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: ((work / n).stat().st_ino, (work / n).stat().st_mtime_ns) for n in names}


# Kill points, in order, for one destination: (description, finished shards, being written?)
SCHEDULES = {
    "early-mid-late": [
        ("writing shard 1", 0, True),
        ("writing shard 4", 3, True),
        ("verifying", -1, False),
    ],
    "each-step": [("started", 0, False), ("one done", 1, False), ("most done", 6, True)],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_local_kill_and_resume_is_byte_identical(
    tiny_hf_dir: Path, tmp_path: Path, reference: Path, schedule: str
) -> None:
    dst = tmp_path / "out"
    work = tmp_path / ".out.ckptflow-staging"
    shards = len(plan_conversion(str(tiny_hf_dir), str(dst), OPTIONS).shards)
    assert shards >= 8
    kept: dict[str, tuple[int, int]] = {}

    def done() -> list[str]:
        records = work / DONE_DIR
        names = (
            [p.name.removesuffix(".json") for p in records.glob("*.json")]
            if records.is_dir()
            else []
        )
        return sorted(names)

    for what, count, mid_write in SCHEDULES[schedule]:
        need = shards if count < 0 else count

        def ready(need: int = need, mid_write: bool = mid_write) -> bool:
            if not (work / INCOMPLETE).exists() or len(done()) < need:
                return False
            return not mid_write or any(work.glob(f"*{PART_SUFFIX}"))

        process = start_cli(str(tiny_hf_dir), str(dst))
        kill_when(process, ready, what)
        assert not dst.exists(), f"killed while {what}: something was published"
        finished_now = done()
        assert len(finished_now) >= need
        # Shards finished before this kill must survive every later run untouched.
        kept.update({n: s for n, s in _stamps(work, finished_now).items() if n not in kept})

    out = finish(start_cli(str(tiny_hf_dir), str(dst)))
    assert "published" in out
    assert tree(dst) == tree(reference)
    assert _stamps(dst, list(kept)) == kept, "a verified shard was rewritten on resume"
    assert kept, "the schedule never killed after a finished shard"
    assert not work.exists() and not (tmp_path / ".out.ckptflow-lock").exists()
    assert "nothing to do" in finish(start_cli(str(tiny_hf_dir), str(dst)))


def test_s3_kill_and_resume(
    tiny_hf_dir: Path, s3: MotoServer, reference: Path, tmp_path: Path
) -> None:
    """Killed twice mid-upload: the lock object of the dead run is broken (same host, process
    gone), finished objects are kept, and the result equals the local reference."""
    make_bucket("resume")
    fs = S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    prefix = "resume/out"
    env = subprocess_env(s3.endpoint)

    def records() -> int:
        try:
            return len(fs.ls(f"{prefix}/{DONE_DIR}"))
        except FileNotFoundError:
            return 0

    etags: dict[str, str] = {}
    marks: dict[str, dict[str, str]] = {}
    for need in (2, 5):
        process = start_cli(str(tiny_hf_dir), f"s3://{prefix}", env)
        kill_when(process, lambda need=need: records() >= need, f"{need} shards")
        assert not fs.exists(f"{prefix}/_SUCCESS")
        assert fs.exists("resume/.out.ckptflow-lock")  # left behind by the dead run
        for path in fs.ls(f"{prefix}/{DONE_DIR}"):
            name = path.rsplit("/", 1)[1].removesuffix(".json")
            etags.setdefault(name, fs.info(f"{prefix}/{name}")["LastModified"])
            if name not in marks:
                # LastModified has one-second resolution; a tag marks the object now instead:
                # any upload (PUT or multipart) of it, even of the same bytes, drops its tags.
                marks[name] = {"finished-by-run": str(need)}
                fs.put_tags(f"{prefix}/{name}", marks[name])
    finish(start_cli(str(tiny_hf_dir), f"s3://{prefix}", env))
    assert {n: fs.info(f"{prefix}/{n}")["LastModified"] for n in etags} == etags
    assert {n: fs.get_tags(f"{prefix}/{n}") for n in marks} == marks, "a kept shard was rewritten"
    local = tmp_path / "copy"
    fs.get(f"{prefix}/", str(local), recursive=True)
    assert tree(local) == tree(reference)
    assert not fs.exists("resume/.out.ckptflow-lock")
