"""Operating the flows: real flow runs on the test harness (one in-process Prefect server).

Retries fire for the right failures (storage faults injected below ckptflow's IO layer, nothing
of the retry rule mocked), runs are named, tagged and typed, artifacts are keyed per
destination and written after publish, manual conversions to one destination queue on a
concurrency limit, and `watch` records, skips and reports broken checkpoints."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from ckpt_core.errors import CkptError, FormatError, StorageRefusedError
from ckpt_core.io import retry
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import convert as core
from ckpt_core.pipeline.watch import FAILED_DIR, failures, record_failure, scan
from ckptflow.cli import main
from tests.helpers.cli_runs import tree


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two IO tries per storage call and tiny Prefect retry delays (the real rule, short waits)."""
    monkeypatch.setenv("CKPTFLOW_TASK_RETRY_DELAY_SECONDS", "0.05")
    old = retry.set_policy(retry.RetryPolicy(attempts=2, base_seconds=0.01))
    yield
    retry.set_policy(old)


def _client_call(fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(run())


def _task_runs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    return list(_client_call(lambda c: c.read_task_runs(flow_run_filter=only)))


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    only = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    found = _client_call(lambda c: c.read_artifacts(artifact_filter=only))
    return {a.key: a for a in found if a.key}


def _flow_run(flow_run_id: UUID) -> Any:
    return _client_call(lambda c: c.read_flow_run(flow_run_id))


def _logs(flow_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    only = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    return [f"{r.name}: {r.message}" for r in _client_call(lambda c: c.read_logs(log_filter=only))]


def _run_id(state: Any) -> UUID:
    run_id = state.state_details.flow_run_id
    assert isinstance(run_id, UUID)
    return run_id


@pytest.mark.prefect
def test_transient_storage_failure_is_retried_by_prefect_then_succeeds(
    prefect_harness: None,
    tiny_hf_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    quick_retries: None,
) -> None:
    from flows.convert import convert_flow

    # The store drops the connection twice in a row: both IO tries of one read fail, so the
    # task fails with StorageUnavailableError, and Prefect's retry (a later try) succeeds.
    real, faults, guard = Location._readinto_local, [0], threading.Lock()

    def flaky(self: Location, where: str, start: int, view: memoryview) -> None:
        with guard:
            faults[0] += 1
            fail = faults[0] <= 2
        if fail:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer", where)
        real(self, where, start, view)

    monkeypatch.setattr(Location, "_readinto_local", flaky)
    dst = tmp_path / "flow"
    state = convert_flow(str(tiny_hf_dir), str(dst), dtype="fp32", return_state=True)
    assert state.is_completed(), state.message
    monkeypatch.undo()
    assert main(["convert", str(tiny_hf_dir), str(tmp_path / "cli"), "--dtype", "fp32"]) == 0
    assert tree(dst) == tree(tmp_path / "cli")
    runs = _task_runs(_run_id(state))
    retried = [r for r in runs if r.run_count > 1]
    assert [(r.name, r.run_count) for r in retried] == [("write model.safetensors", 2)]
    # ckptflow's own retry warnings reach the run's logs (the UI), not only stderr.
    logs = _logs(_run_id(state))
    assert any(line.startswith("ckptflow.retry:") and "transient" in line for line in logs), logs


@pytest.mark.prefect
def test_deleted_source_file_fails_at_once_naming_it_and_the_parameter(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.convert import convert_flow

    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dir, src)
    real = Location._readinto_local

    def vanishing(self: Location, where: str, start: int, view: memoryview) -> None:
        Path(where).unlink(missing_ok=True)  # the object is deleted while the run reads it
        real(self, where, start, view)

    monkeypatch.setattr(Location, "_readinto_local", vanishing)
    # The real retry delays (2 s, 10 s, 30 s): a retry would show as a run_count and a wait.
    monkeypatch.delenv("CKPTFLOW_TASK_RETRY_DELAY_SECONDS", raising=False)
    started = time.monotonic()
    state = convert_flow(str(src), str(tmp_path / "out"), dtype="fp32", return_state=True)
    assert state.is_failed()
    with pytest.raises(StorageRefusedError) as caught:
        state.result()
    message = str(caught.value)
    assert time.monotonic() - started < 30
    assert len(message.splitlines()) == 1
    assert f"{src / 'model.safetensors'}: does not exist" in message
    assert message.endswith("(parameter src)"), message
    write = [r for r in _task_runs(_run_id(state)) if r.name.startswith("write model")]
    assert [r.run_count for r in write] == [1]
    assert _flow_run(_run_id(state)).state.message.count("does not exist") == 1


@pytest.mark.prefect
def test_flow_errors_name_parameters_not_cli_flags(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    from flows.convert import convert_flow

    with pytest.raises(CkptError) as caught:
        convert_flow(str(tiny_hf_dir), str(tmp_path / "out"), latest=True)
    message = str(caught.value)
    assert "parameter latest" in message and "--latest" not in message, message


@pytest.mark.prefect
def test_runs_are_named_tagged_and_report_after_publish_per_destination(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    from flows.convert import convert_flow

    runs = tmp_path / "run1"
    shutil.copytree(tiny_hf_dir, runs / "global_step200")
    states = {
        name: convert_flow(
            str(runs / "global_step200"),
            str(tmp_path / "hf" / name),
            dtype="fp32",
            max_shard_size="150KB",
            return_state=True,
        )
        for name in ("run1-200", "run1-200b")
    }
    keys: set[str] = set()
    for name, state in states.items():
        assert state.is_completed(), state.message
        run = _flow_run(_run_id(state))
        assert run.name == f"convert: run1/global_step200 -> hf/{name}"
        assert {"format:hf", "dtype:fp32", "to:hf"} <= set(run.tags)
        tasks = _task_runs(run.id)
        shards = sorted(r.name for r in tasks if r.name.startswith("write model"))
        assert len(shards) >= 2
        assert shards[0] == f"write model-00001-of-{len(shards):05d}.safetensors"
        assert all(set(run.tags) <= set(r.tags) for r in tasks if r.name.startswith("verify "))
        found = _artifacts(run.id)
        assert {k.split("-")[1] for k in found} == {"report", "summary", "progress"}
        assert not keys & set(found)  # every key names its destination
        keys |= set(found)
        report = next(a for k, a in found.items() if k.startswith("convert-report-"))
        assert report.data and json.loads(report.data)[0] == {"item": "published", "value": "yes"}
        published = next(r for r in tasks if r.name.startswith("publish"))
        assert report.created >= published.end_time  # the report says what was published
        progress = next(a for k, a in found.items() if k.startswith("convert-progress-"))
        assert progress.data == 100


@pytest.mark.prefect
def test_verification_failure_fails_the_run_with_its_report(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.convert import convert_flow

    real = core.write_shard

    def corrupting(plan: Any, number: int, *args: Any) -> Any:
        record = real(plan, number, *args)
        shard = Path(plan.target.work_url) / plan.shards[number].filename
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF  # the store flips bits of the last tensor after the write
        shard.write_bytes(bytes(data))
        return record

    monkeypatch.setattr(core, "write_shard", corrupting)
    dst = tmp_path / "out"
    state = convert_flow(str(tiny_hf_dir), str(dst), dtype="fp32", return_state=True)
    assert state.is_failed() and "tensors differ from the source" in str(state.message)
    assert not dst.exists()
    found = _artifacts(_run_id(state))
    report = next(a for k, a in found.items() if k.startswith("convert-report-"))
    rows = {r["item"]: r["value"] for r in json.loads(report.data)}
    assert rows["published"] == "no" and rows["verdict"] == "FAILED"
    summary = next(a for k, a in found.items() if k.startswith("convert-summary-"))
    assert "nothing was published" in summary.description


@pytest.mark.prefect
def test_manual_runs_to_one_destination_queue_on_its_concurrency_limit(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.convert import convert_flow
    from tasks.runs import artifact_key

    # Each shard takes a while: without the limit, the second run would find the destination
    # locked by the first and fail at once (wait_seconds is 0).
    real = core.write_shard

    def slow(*args: Any) -> Any:
        time.sleep(0.5)
        return real(*args)

    monkeypatch.setattr(core, "write_shard", slow)
    dst = tmp_path / "out"
    outcomes: list[Any] = []

    def run() -> None:
        outcomes.append(convert_flow(str(tiny_hf_dir), str(dst), dtype="fp32", wait_seconds=0))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(o["published"] for o in outcomes) == [False, True], outcomes
    limit = _client_call(
        lambda c: c.read_global_concurrency_limit_by_name(artifact_key("ckptflow-dst", str(dst)))
    )
    assert limit.limit == 1 and limit.active_slots == 0


def test_flow_parameters_are_typed_and_described() -> None:
    from flows.convert import convert_flow
    from flows.post_training import post_training
    from flows.watch import watch_flow

    for flow in (convert_flow, watch_flow, post_training):
        properties = flow.parameters.model_dump()["properties"]
        undescribed = [n for n, p in properties.items() if not p.get("description")]
        assert not undescribed, (flow.name, undescribed)
    schema = json.dumps(convert_flow.parameters.model_dump())
    for choice in ('"bf16"', '"fp16"', '"keep"', '"dcp"', '"ema"', '"cuda"'):
        assert choice in schema  # dropdowns in the run form, checked before a worker starts


# ---- watch -----------------------------------------------------------------------------------


def _checkpoint(source: Path, where: Path, age_seconds: float) -> Path:
    shutil.copytree(source, where)
    stamp = time.time() - age_seconds
    for path in where.rglob("*"):
        os.utime(path, (stamp, stamp))
    return where


def _break(checkpoint: Path) -> None:
    """A checkpoint that detects as HF but cannot be read: its safetensors header is cut."""
    shard = checkpoint / "model.safetensors"
    stamp = shard.stat().st_mtime
    shard.write_bytes(shard.read_bytes()[:64])
    os.utime(shard, (stamp, stamp))  # broken long ago: not a checkpoint still being written


@pytest.mark.prefect
def test_watch_records_a_broken_checkpoint_and_goes_on_newest_first(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.watch import watch_flow
    from tasks.runs import artifact_key

    monkeypatch.setenv("CKPTFLOW_TASK_RETRY_DELAY_SECONDS", "0.05")
    root, out = tmp_path / "runs", tmp_path / "hf"
    _checkpoint(tiny_hf_dir, root / "step100", age_seconds=3000)
    broken = _checkpoint(tiny_hf_dir, root / "step200", age_seconds=2000)
    _break(broken)
    _checkpoint(tiny_hf_dir, root / "step300", age_seconds=1000)
    args: dict[str, Any] = {"dtype": "fp32", "max_conversions": 2, "quiet_minutes": 5}

    # Run 1: newest first: step300 converts, step200 fails and is recorded; step100 waits.
    with pytest.raises(CkptError, match="1 conversion\\(s\\) failed: .*step200"):
        watch_flow(str(root), str(out), **args)
    assert (out / "step300" / "_SUCCESS").exists() and not (out / "step100").exists()
    record = json.loads((out / FAILED_DIR / "step200.json").read_text())
    assert record["src"] == str(broken) and "model.safetensors" in record["error"]

    # Run 2: the broken one is skipped (reported), so step100 gets its slot: never stalls.
    state = watch_flow(str(root), str(out), **args, return_state=True)
    outcome = state.result()
    assert outcome["converted"] == [str(root / "step100")]
    assert outcome["skipped_failed"] == [str(broken)]
    report = _artifacts(_run_id(state))[artifact_key("watch-report", str(out))]
    assert f"| `{broken}` | skipped (failed before, unchanged) |" in report.data
    # Run 3: nothing new; the broken one is still skipped, not retried: Completed.
    assert watch_flow(str(root), str(out), **args)["converted"] == []

    # Fixed (its files change): tried again without clearing, and the record goes.
    shutil.copy(tiny_hf_dir / "model.safetensors", broken / "model.safetensors")
    os.utime(broken / "model.safetensors", (time.time() - 600,) * 2)
    outcome = watch_flow(str(root), str(out), **args)
    assert outcome["converted"] == [str(broken)] and failures(str(out)) == {}
    assert (out / "step200" / "_SUCCESS").exists()


@pytest.mark.prefect
def test_watch_retry_failed_clears_the_records(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    from flows.watch import watch_flow

    root, out = tmp_path / "runs", tmp_path / "hf"
    _break(_checkpoint(tiny_hf_dir, root / "step1", age_seconds=1000))
    with pytest.raises(CkptError):
        watch_flow(str(root), str(out), dtype="fp32")
    assert watch_flow(str(root), str(out), dtype="fp32")["skipped_failed"] == [str(root / "step1")]
    with pytest.raises(CkptError, match="step1"):  # tried again, fails again, recorded again
        watch_flow(str(root), str(out), dtype="fp32", retry_failed=True)
    assert set(failures(str(out))) == {"step1"}


@pytest.mark.prefect
def test_watch_leaves_a_destination_another_run_holds_for_the_next_run(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    """A busy destination is not a broken checkpoint: nothing is recorded, the next run
    converts it."""
    from ckpt_core.errors import DestinationBusyError
    from ckpt_core.io.lock import destination_lock
    from flows.watch import watch_flow

    root, out = tmp_path / "runs", tmp_path / "hf"
    _checkpoint(tiny_hf_dir, root / "step1", age_seconds=1000)
    out.mkdir()
    busy = destination_lock(Location(str(out / "step1")))  # another run is writing it
    with busy, pytest.raises(CkptError, match="DestinationBusyError"):
        watch_flow(str(root), str(out), dtype="fp32")
    assert failures(str(out)) == {}
    assert retry.worth_another_run(DestinationBusyError("busy"))
    assert watch_flow(str(root), str(out), dtype="fp32")["converted"] == [str(root / "step1")]


@pytest.mark.prefect
def test_watch_fails_when_the_root_is_missing(prefect_harness: None, tmp_path: Path) -> None:
    from flows.watch import watch_flow

    state = watch_flow(str(tmp_path / "nope"), str(tmp_path / "hf"), return_state=True)
    assert state.is_failed()
    with pytest.raises(StorageRefusedError) as caught:
        state.result()
    message = str(caught.value)
    assert f"{tmp_path / 'nope'}: the watched root does not exist" in message
    assert "parameter root" in message and "--root" not in message


def test_scan_waits_for_checkpoints_still_being_written(tiny_hf_dir: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "runs", tmp_path / "hf"
    _checkpoint(tiny_hf_dir, root / "old", age_seconds=3600)
    _checkpoint(tiny_hf_dir, root / "fresh", age_seconds=30)
    # A DeepSpeed save whose `latest` is not written yet (the names are all detection needs).
    tag = root / "ds" / "global_step10"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    found = scan(str(root), str(out), quiet_seconds=600)
    assert [p.name for p in found.pending] == ["old"]
    assert {Path(src).name: why for src, why in found.busy}.keys() == {"fresh", "ds"}
    assert "no `latest` file yet" in dict(found.busy)[str(root / "ds")]
    (root / "ds" / "latest").write_text("global_step10")
    for path in (root / "ds").rglob("*"):
        os.utime(path, (time.time() - 7200,) * 2)
    later = scan(str(root), str(out), quiet_seconds=600)
    assert [p.name for p in later.pending] == ["old", "ds"]  # newest first
    assert [Path(src).name for src, _ in later.busy] == ["fresh"]
    with pytest.raises(StorageRefusedError, match="is not a directory"):
        scan(str(root / "old" / "config.json"), str(out))


def test_scan_and_failure_records_on_s3(tiny_hf_dir: Path, bucket: str) -> None:
    """On an object store: change times from LastModified, records written beside the outputs."""
    from tests.s3server import fs

    store = fs()
    store.put(str(tiny_hf_dir), f"{bucket}/runs/step1", recursive=True)
    root, out = f"s3://{bucket}/runs", f"s3://{bucket}/hf"
    assert scan(root, out, quiet_seconds=600).pending == []  # just uploaded: still being written
    found = scan(root, out, quiet_seconds=600, now=time.time() + 3600)
    assert [(p.src, p.dst, p.format) for p in found.pending] == [
        (f"{root}/step1", f"{out}/step1", "hf")
    ]
    record_failure(out, found.pending[0], "FormatError: truncated")
    assert store.exists(f"{bucket}/hf/{FAILED_DIR}/step1.json")
    again = scan(root, out, now=time.time() + 3600)
    assert again.pending == [] and [f.name for f in again.failed] == ["step1"]
    with pytest.raises(StorageRefusedError, match="the watched root does not exist"):
        scan(f"s3://{bucket}/nothing-here", out)


def test_errors_in_flow_terms() -> None:
    from tasks.runs import flag_names, in_flow_terms

    flags = flag_names(["base", "max_shard_size", "src", "dst"], wait_for_lock="wait_seconds")
    urls = {"dst": "s3://b/hf/run1", "src": "s3://b/hf"}
    said = in_flow_terms(
        CkptError("pass --base DIR or --wait-for-lock 60; --json stays"), flags, urls
    )
    assert str(said) == "pass parameter base DIR or parameter wait_seconds 60; --json stays"
    # s3fs names objects without the scheme; the longest URL that holds the file wins.
    gone = in_flow_terms(
        FileNotFoundError(2, "No such key", "b/hf/run1/x.safetensors"), flags, urls
    )
    assert isinstance(gone, StorageRefusedError)
    assert str(gone).startswith("b/hf/run1/x.safetensors: does not exist")
    assert str(gone).endswith("(parameter dst)")
    missing = in_flow_terms(FormatError("s3://b/hf/x: no such file or directory"), flags, urls)
    assert isinstance(missing, FormatError) and str(missing).endswith(
        "x: no such file or directory (parameter src)"
    )
    bug = RuntimeError("--base")
    assert in_flow_terms(bug, flags, urls) is bug  # a bug keeps its type and traceback
