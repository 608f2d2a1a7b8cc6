"""The front ends take their options by name: the library's, the flows' and the tasks' options
are keyword-only after the URLs, and `ckptflow convert --prefect` honours `--workers` and
`--wait-for-lock` as the in-process run does."""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from ckpt_core.io import lock as lock_module
from ckpt_core.io.lock import destination_lock
from ckpt_core.io.storage import Location
from ckpt_core.pipeline import convert as core
from ckpt_core.pipeline.conversion import ConvertFlags, options_from
from ckpt_core.vlm.merge import merge
from ckptflow.cli import build_parser, main
from tests.helpers.cli_runs import tree


def _positional(fn: Callable[..., Any]) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def test_options_after_the_urls_are_keyword_only() -> None:
    from flows.convert import convert_flow
    from flows.post_training import post_training
    from flows.watch import watch_flow
    from tasks import vlm

    assert _positional(options_from) == []
    with pytest.raises(TypeError):
        options_from("fp32")  # no positional flag tuples
    assert options_from(dtype="fp32", max_shard_size="1KB").max_shard_bytes == 1000
    expected = {
        convert_flow.fn: ["src", "dst"],
        watch_flow.fn: ["root", "out_root"],
        post_training.fn: ["model", "work_dir"],
        vlm.merge.fn: ["train_dir", "merged_dir", "model"],
        vlm.train.fn: ["split_dir", "train_dir"],
        vlm.split.fn: ["model", "split_dir"],
        merge: ["checkpoint_url", "output_url", "base_url"],
        core.convert: ["src_url", "dst_url", "options"],
        core.run_plan: ["plan"],
    }
    assert {fn: _positional(fn) for fn in expected} == expected


def test_the_cli_flags_the_flow_parameters_and_convert_flags_are_one_set_of_names() -> None:
    from flows.convert import convert_flow

    names = {f.name for f in fields(ConvertFlags)}
    assert set(convert_flow.parameters.properties) == names | {"src", "dst", "wait_seconds"}
    args = build_parser().parse_args(["convert", "a", "b"])
    assert names <= set(vars(args))
    assert options_from(**{n: getattr(args, n) for n in names}) == ConvertFlags().options()


@pytest.fixture
def shard_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[int]]:
    """The threads that wrote shards; the first three writes wait for each other, so a run
    with fewer than three workers fails (BrokenBarrierError) instead of passing slowly."""
    real = core.write_shard
    threads: set[int] = set()
    barrier = threading.Barrier(3, timeout=60)
    calls = iter(range(10**6))
    guard = threading.Lock()

    def write_shard(*args: Any, **kwargs: Any) -> Any:
        with guard:
            first_three = next(calls) < 3
            threads.add(threading.get_ident())
        if first_three:
            barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "write_shard", write_shard)
    yield threads


ARGS = ["--dtype", "fp32", "--max-shard-size", "40KB", "--prefect"]


@pytest.mark.prefect
def test_prefect_run_honours_workers(
    prefect_harness: None, tiny_hf_dir: Path, tmp_path: Path, shard_threads: set[int]
) -> None:
    dst = tmp_path / "out"
    assert main(["convert", str(tiny_hf_dir), str(dst), *ARGS, "--workers", "3"]) == 0
    assert len(shard_threads) == 3
    assert (dst / "_SUCCESS").exists()


@pytest.mark.prefect
def test_prefect_run_honours_wait_for_lock(
    prefect_harness: None,
    tiny_hf_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dst = tmp_path / "out"
    waiting, held = threading.Event(), threading.Event()

    class Clock:
        """The lock module's clock; its sleep is the lock's poll while another run holds it."""

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def sleep(self, seconds: float) -> None:
            waiting.set()
            time.sleep(seconds)

    monkeypatch.setattr(lock_module, "time", Clock())

    def hold() -> None:
        with destination_lock(Location(str(dst))):
            held.set()
            waiting.wait(300)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        assert main(["convert", str(tiny_hf_dir), str(dst), *ARGS, "--wait-for-lock", "0"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("ckptflow: error:"), last
        assert f"another ckptflow run (pid {os.getpid()} on " in last
        assert not dst.exists() and not waiting.is_set()
        # The lock is let go only once the flow run polls for it: it waited, then published.
        code = main(["convert", str(tiny_hf_dir), str(dst), *ARGS, "--wait-for-lock", "300"])
    finally:
        waiting.set()
        holder.join(60)
    assert code == 0
    reference = tmp_path / "reference"
    assert main(["convert", str(tiny_hf_dir), str(reference), *ARGS[:-1]]) == 0
    assert tree(dst) == tree(reference)
